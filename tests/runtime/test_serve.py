"""lowbit serve (runtime/serve.py) on loopback, driven by the official ``openai`` client as a real client:
completions, chat, streaming (equal to non-streaming), concurrent requests (each equal to its run alone), malformed
requests (HTTP 4xx with OpenAI's error body), and a client that disconnects mid-stream (its row is freed)."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import lowbit

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lowbit.runtime.serve import ServeLimits, Server, create_app  # noqa: E402

PROMPTS = ["the model reads every weight", "four bit", "a group of sixty four weights is", "one scale per",
           "the cache holds keys and", "tokens"]


@pytest.fixture(scope="module")
def served(chat_model, tmp_path_factory):
    art = lowbit.compile(str(chat_model[0]), "rtn-w4g64", out=tmp_path_factory.mktemp("serve") / "a", target="onnx",
                         quiet=True)
    engine = lowbit.load(art, backend="ort")
    server = Server(engine, "tiny", ServeLimits(max_batch=4, request_timeout=120))
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not web.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = web.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    yield client, server, engine, f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(60)
    assert not thread.is_alive() and not server.batcher.thread.is_alive()      # shut down cleanly


def post(url, raw: bytes):
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(served):
    client, _, _, base = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_completions_are_the_engines_text(served):
    client, _, engine, _ = served
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=8)
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len(engine._text.encode([PROMPTS[0]])[0])
    assert got.usage.completion_tokens <= 8 and got.usage.total_tokens == got.usage.prompt_tokens + \
        got.usage.completion_tokens
    both = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.text for c in both.choices] == [engine.generate(p, max_new_tokens=6) for p in PROMPTS[:2]]
    # Sampling: a seed reproduces, and n choices sample from their own streams.
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, top_p=0.9, seed=3, n=2)
    a, b = (client.completions.create(**kw) for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and a.choices[0].text != a.choices[1].text
    assert a.choices[0].text == engine.generate(PROMPTS[1], max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)


def test_chat_and_streams_equal_their_whole_replies(served):
    client, _, engine, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    reply = engine.chat(messages, max_new_tokens=10)
    assert got.choices[0].message.content == reply["content"] and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply["content"]
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    pieces = list(client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True))
    assert len(pieces) > 3
    assert "".join(p.choices[0].text for p in pieces) == engine.generate(PROMPTS[2], max_new_tokens=12)


def test_concurrent_requests_each_get_their_own_text(served):
    client, server, engine, _ = served
    want = [engine.generate(p, max_new_tokens=16, stop_at_eos=False) for p in PROMPTS]
    steps = server.batcher.steps

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == want
    assert server.batcher.steps - steps < len(PROMPTS) * 15          # rows shared decode steps


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "x", "temperature": 5}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n must be"),
    (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "exceeds the model's context"),
    (json.dumps({"prompt": 7}).encode(), 400, "prompt must be"),
    (json.dumps({"prompt": [1, 10 ** 9]}).encode(), 400, "token ids must be"),
    (json.dumps({"prompt": "x", "logprobs": 99}).encode(), 400, "logprobs must be"),
    (json.dumps({"prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400, "only allowed when"),
    (json.dumps({"prompt": "x", "stream": True, "stream_options": {"x": 1}}).encode(), 400, "include_usage"),
    (json.dumps({"prompt": "x", "logit_bias": {"1": 5}}).encode(), 400, "logit_bias is not supported"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "is not served here"),
])
def test_malformed_requests_get_4xx_with_a_json_error(served, body, status, needle):
    code, doc = post(served[3] + "/v1/completions", body)
    assert code == status and needle in doc["error"]["message"], doc


def model_logprobs(engine, prompt_ids, tokens, shift=0):
    """log-softmax of the engine's own logits at each generated token's position (``shift``: a wrong position,
    the control), and the generated tokens' entries."""
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    logits = engine.forward(ids)[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 - shift:len(prompt_ids) - 1 - shift + len(tokens)]
    return lp, lp[torch.arange(len(tokens)), torch.tensor(tokens)]


def test_logprobs_are_the_models_own(served):
    client, _, engine, _ = served
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    c = got.choices[0]
    ids = engine._text.encode([PROMPTS[0]])[0]
    tokens = [engine._text.encode([t], add_special_tokens=False)[0] for t in c.logprobs.tokens]
    assert all(len(t) == 1 for t in tokens) and "".join(c.logprobs.tokens) == c.text
    tokens = [t[0] for t in tokens]
    full, want = model_logprobs(engine, ids, tokens)
    assert np.allclose(c.logprobs.token_logprobs, want.numpy(), atol=1e-4)
    _, wrong = model_logprobs(engine, ids, tokens, shift=1)                       # the check can fail
    assert not np.allclose(c.logprobs.token_logprobs, wrong.numpy(), atol=1e-4)
    for step, top in enumerate(c.logprobs.top_logprobs):
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert np.isclose(max(top.values()), full[step].max().item(), atol=1e-4)   # greedy: the likeliest
    assert c.logprobs.text_offset == list(np.cumsum([0] + [len(t) for t in c.logprobs.tokens[:-1]]))
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2).choices[0]
    assert len(whole.logprobs.content) == 8 and all(len(e.top_logprobs) == 2 for e in whole.logprobs.content)
    assert "".join(e.token for e in whole.logprobs.content) == whole.message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.logprobs.content]


def test_a_stream_can_end_with_its_usage(served):
    client = served[0]
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in plain)


def test_malformed_chat_is_refused_by_the_client_too(served):
    client = served[0]
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    client, server, _, _ = served
    steps = server.batcher.steps
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.time() + 30
    while server.batcher.running:
        assert time.time() < deadline, "the disconnected request kept its row"
        time.sleep(0.05)
    assert server.batcher.steps - steps < 150
    # The server goes on serving.
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_lowbit_serve_command_serves_and_shuts_down_on_sigterm(served):
    import re
    import signal
    import subprocess
    import sys

    engine = served[2]
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", str(engine.path), "--port", "0", "--name", "m"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port, seen = None, []
        deadline = time.time() + 120
        while port is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(seen)
            assert time.time() < deadline, "".join(seen)
            seen.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        code, doc = post(f"http://127.0.0.1:{port}/v1/completions",
                         json.dumps({"model": "m", "prompt": "four bit", "max_tokens": 4, "temperature": 0}).encode())
        assert code == 200 and doc["choices"][0]["text"] == engine.generate("four bit", max_new_tokens=4)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down (the lifespan closes the batcher after its running requests), then re-raises the
        # signal so the exit status still says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stderr.read()
    finally:
        proc.kill()
