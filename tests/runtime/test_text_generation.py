"""Text in, text out (runtime/text.py, detokenize.py, chat.py) on a compiled tiny model: streamed text is the
non-streamed text, on the torch backend, ONNX Runtime and the torch-free engine alike; the same seed samples the
same tokens on each; stop strings cut where they say; chat renders the model's own template as transformers does,
in a sandbox."""

import json

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.runtime.chat import ChatTemplate
from lowbit.runtime.detokenize import TextDecoder
from lowbit.runtime.lite import LiteEngine

PROMPTS = ["four bit weights", "the model reads every weight once per step and"]
SAMPLING = dict(do_sample=True, temperature=1.2, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                presence_penalty=0.3, frequency_penalty=0.2, seed=11)


@pytest.fixture(scope="module")
def art(chat_model, tmp_path_factory):
    return lowbit.compile(str(chat_model[0]), "rtn-w4g64", out=tmp_path_factory.mktemp("art") / "a", target="onnx",
                          quiet=True)


@pytest.fixture(scope="module")
def engines(art):
    # The torch backend's reference kernels: its CPU kernels decode on bfloat16 activations (speed), which moves
    # the logits by ~1e-3 from ONNX Runtime's float32 and so, now and then, a sampled token.
    return {"torch": lowbit.load(art, backend="torch", kernels="reference"), "ort": lowbit.load(art, backend="ort"),
            "lite": LiteEngine.load(art)}


@pytest.mark.parametrize("settings", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_streamed_text_is_the_text_on_every_engine(engines, settings):
    for name, eng in engines.items():
        for prompt in PROMPTS:
            text = eng.generate(prompt, max_new_tokens=24, stop_at_eos=False, **settings)
            streamed = list(eng.stream(prompt, max_new_tokens=24, stop_at_eos=False, **settings))
            assert "".join(streamed) == text and len(streamed) > 3, name
            got = []
            assert eng.generate(prompt, max_new_tokens=24, stop_at_eos=False, callback=got.append, **settings) == text
            assert got == streamed


@pytest.mark.parametrize("settings", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_same_seed_same_text_on_every_engine(engines, settings):
    want = engines["torch"].generate(PROMPTS, max_new_tokens=24, stop_at_eos=False, **settings)
    assert want[0] != want[1] and all(len(t) > 10 for t in want)
    for name, eng in engines.items():
        assert eng.generate(PROMPTS, max_new_tokens=24, stop_at_eos=False, **settings) == want, name
    if settings:                                      # control: another seed samples another text
        assert engines["ort"].generate(PROMPTS, max_new_tokens=24, stop_at_eos=False,
                                       **{**settings, "seed": 12}) != want


def test_text_is_the_decoded_tokens(engines, tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = engines["torch"].generate_ids(enc["input_ids"], enc["attention_mask"], max_new_tokens=16, stop_at_eos=False)
    want = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert engines["ort"].generate(PROMPTS, max_new_tokens=16, stop_at_eos=False) == want


def test_stop_strings_end_the_text_before_them(engines):
    full = engines["ort"].generate(PROMPTS[1], max_new_tokens=24, stop_at_eos=False)
    stop = full[8:11]
    assert len(stop.strip()) >= 2
    for eng in engines.values():
        got = eng.generate(PROMPTS[1], max_new_tokens=24, stop_at_eos=False, stop=[stop, "never appears"])
        assert got == full[:full.index(stop)]
        assert "".join(eng.stream(PROMPTS[1], max_new_tokens=24, stop_at_eos=False, stop=stop)) == got


def test_the_leading_space_survives_a_tokenizer_that_strips_it():
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordLevel({"\u2581Hello": 0, "\u2581world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    assert tok.decode([1]) == "world"                            # alone, SentencePiece's first space is dropped
    text = TextDecoder(tok.decode, prompt=[0])
    assert text.add(1) + text.add(2) == " world!"                # after the prompt it is kept


def test_chat_renders_the_models_template_as_transformers_does(engines, chat_model):
    _, tok = chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    template = engines["ort"].chat_template()
    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else "Bye"} for m in messages]
    assert template.render(messages) == tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert template.render(messages).endswith("<assistant>") and "<pad><system>" in template.render(messages)
    for name, eng in engines.items():
        reply = eng.chat(messages, max_new_tokens=12, stop_at_eos=False)
        ids = tok(tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        want = engines["torch"].generate_ids(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                             max_new_tokens=12, stop_at_eos=False)
        assert reply == {"role": "assistant", "content": tok.decode(want[0, len(ids):], skip_special_tokens=True)}, name
        assert "".join(eng.chat(messages, max_new_tokens=12, stop_at_eos=False, stream=True)) == reply["content"]


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty list"), ([{"role": "wizard", "content": "x"}], "role"), ([{"role": "user"}], "content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "text parts"), ("hello", "non-empty list"),
])
def test_malformed_messages_are_refused_in_one_line(engines, messages, needle):
    with pytest.raises(LowbitError, match=needle):
        engines["lite"].chat(messages)


def test_templates_run_sandboxed_and_fail_in_one_line(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(LowbitError, match="chat template failed"):
        ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% if messages|length > 1 %}{{ raise_exception('one only') }}"
                                                  "{% endif %}{{ messages[0]['content'] }}")
    assert ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(LowbitError, match="refused these messages: one only"):
        ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}] * 2)
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(LowbitError, match="does not parse"):
        ChatTemplate.load(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default",
                                                                                   "template": "{{ 1 + 1 }}"}]}))
    assert ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}]) == "2"


def test_a_model_without_a_template_refuses_chat(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", quiet=True)
    with pytest.raises(LowbitError, match="has no chat template"):
        lowbit.load(art).chat([{"role": "user", "content": "hi"}])


def test_cli_streams_the_same_text_and_chats(art, engines, tmp_path, capsys, monkeypatch):
    import io

    from tests.test_cli import _bad, run_cli

    code, out, _ = run_cli(capsys, "run", art, "-p", PROMPTS[0], "-n", "12", "--stream", "--backend", "ort")
    assert code == 0 and out == PROMPTS[0] + engines["ort"].generate(PROMPTS[0], max_new_tokens=12) + "\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = engines["ort"].chat(messages, max_new_tokens=8)["content"]
    code, out, _ = run_cli(capsys, "run", art, "--chat", "--system", "Be brief.", "-p", "Hi", "-n", "8", "--json")
    assert code == 0 and json.loads(out) == {"prompt": "Hi", "reply": reply}
    # A conversation on stdin: each line a turn, the history kept.
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\nAnd again\n"))
    code, out, _ = run_cli(capsys, "run", art, "--chat", "--system", "Be brief.", "-n", "8", "--json")
    turns = [json.loads(line)["reply"] for line in out.splitlines()]
    second = engines["ort"].chat(messages + [{"role": "assistant", "content": reply},
                                             {"role": "user", "content": "And again"}], max_new_tokens=8)["content"]
    assert code == 0 and turns == [reply, second]
    _bad(capsys, tmp_path, "run", art, "-n", "8", needle="give a prompt with --prompt (-p), or --chat")
