"""onnxruntime-genai runs a lowbit ONNX artifact as it is (genai_config.json): the same greedy tokens as
``lowbit run --backend ort``. Skipped where onnxruntime-genai is not installed (pip install 'lowbit[bench]')."""

import json

import pytest
import torch

import lowbit
from lowbit.compiler.pipeline import CalibrationArgs

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")

PROMPTS = ["four bit weights", "the model reads every weight once per step"]


def _og_greedy(art, prompt: str, new: int) -> list[int]:
    model = og.Model(str(art))
    ids = og.Tokenizer(model).encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


@pytest.mark.parametrize("arch,recipe", [("llama", "rtn-w4g64"), ("qwen2", "gptq-w4g64"), ("gpt2", "rtn-w4g32"),
                                         ("opt", "fp")])
def test_genai_runs_the_artifact_like_the_ort_backend(arch, recipe, model_dirs, text_file, tmp_path):
    calib = CalibrationArgs(str(text_file), samples=4, seq_len=32) if recipe.startswith("gptq") else None
    art = lowbit.compile(str(model_dirs[arch]), recipe, out=tmp_path / "a", target="onnx", quiet=True,
                         **({"calib": calib} if calib else {}))
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["onnx"]["genai"]["written"] and (art / "genai_config.json").is_file()
    assert "genai_config.json" in manifest["files"] and "tokenizer.json" in manifest["files"]
    # Rotary attention became GroupQueryAttention, which writes onnxruntime-genai's shared buffers in place.
    shared = json.loads((art / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    assert shared == (arch in ("llama", "qwen2")) == manifest["onnx"]["genai"]["in_place_cache"]
    eng = lowbit.load(art, backend="ort")
    for prompt in PROMPTS:
        ours = eng.tokenizer(prompt, return_tensors="pt")["input_ids"]
        theirs = _og_greedy(art, prompt, 12)
        assert theirs[:ours.shape[1]] == ours[0].tolist()          # one tokenizer
        gen = eng.generate_ids(ours, torch.ones_like(ours), max_new_tokens=12, stop_at_eos=False)[0].tolist()
        assert theirs == gen[:len(theirs)] and len(theirs) > ours.shape[1], (prompt, theirs, gen)


def test_encoders_get_no_genai_config(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["bert"]), "rtn-w8", out=tmp_path / "b", target="onnx", quiet=True)
    assert not (art / "genai_config.json").exists()
    assert "genai" not in json.loads((art / "manifest.json").read_text())["onnx"]
