"""The runtime without torch (runtime/lite.py): in a process where importing torch or transformers fails, an ONNX
artifact loads, generates the ORT backend's greedy tokens and text, and embeds like it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowbit

BLOCKED = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"

CHILD = BLOCKED + """
import json, lowbit
eng = lowbit.load(sys.argv[1], backend="ort")
assert type(eng).__name__ == "LiteEngine"
prompts = json.loads(sys.argv[2])
if eng.task == "encoder":
    print(json.dumps({"embed": eng.embed(prompts).tolist()}))
else:
    ids, mask = eng.tokenizer.encode_batch(prompts)
    print(json.dumps({"ids": eng.generate_ids(ids, mask, max_new_tokens=10, stop_at_eos=False).tolist(),
                      "sampled": eng.generate_ids(ids, mask, stop_at_eos=False, **SAMPLING).tolist(),
                      "texts": eng.generate(prompts, max_new_tokens=10)}))
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""

PROMPTS = ["four bit weights", "the model reads every weight once per step"]
SAMPLING = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=7)


def _child(art, prompts=PROMPTS):
    code = f"SAMPLING = {SAMPLING!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code, str(art), json.dumps(prompts)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_causal_lm_runs_without_torch(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", target="onnx", quiet=True)
    got = _child(art)
    eng = lowbit.load(art, backend="ort")
    eng.tokenizer.padding_side = "left"                                 # as Engine.generate pads
    enc = eng.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    want = eng.generate_ids(enc["input_ids"], enc["attention_mask"], max_new_tokens=10, stop_at_eos=False)
    assert got["ids"] == want.tolist()
    assert got["texts"] == eng.generate(PROMPTS, max_new_tokens=10)
    # One loop and sampler for every runtime path: the same seed samples the same tokens with and without torch,
    # on ONNX Runtime and on the torch backend; another seed samples others (the check can fail).
    sampled = eng.generate_ids(enc["input_ids"], enc["attention_mask"], stop_at_eos=False, **SAMPLING).tolist()
    torch_backend = lowbit.load(art, backend="torch")
    assert got["sampled"] == sampled == torch_backend.generate_ids(
        enc["input_ids"], enc["attention_mask"], stop_at_eos=False, **SAMPLING).tolist()
    assert sampled != eng.generate_ids(enc["input_ids"], enc["attention_mask"], stop_at_eos=False,
                                       **{**SAMPLING, "seed": 8}).tolist()


def test_encoder_embeds_without_torch(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["bert"]), "rtn-w8", out=tmp_path / "b", target="onnx", quiet=True)
    got = np.array(_child(art)["embed"])
    want = lowbit.load(art, backend="ort").embed(PROMPTS).numpy()
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_without_torch_a_torch_artifact_is_refused_in_one_line(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "fp", out=tmp_path / "t", quiet=True)
    code = BLOCKED + "import lowbit\nlowbit.load(sys.argv[1])\n"
    proc = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no ONNX model; recompile it with --target onnx" in proc.stderr
    assert torch.__version__        # this process has torch: only the child blocks it


def test_lowbit_run_works_without_torch(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", target="onnx", quiet=True)
    code = BLOCKED + "from lowbit.cli import main\nsys.exit(main())\n"
    proc = subprocess.run([sys.executable, "-c", code, "run", str(art), "-p", PROMPTS[0], "--max-new-tokens", "6",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = lowbit.load(art, backend="ort").generate(PROMPTS[0], max_new_tokens=6)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"prompt": PROMPTS[0], "completion": want}


def test_the_server_and_its_batcher_run_without_torch(model_dirs, tmp_path):
    pytest.importorskip("fastapi")
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", target="onnx", quiet=True)
    code = BLOCKED + """
import json, lowbit
from lowbit.runtime.sampling import GenerationSettings
from lowbit.runtime.serve import Server, create_app
server = Server(lowbit.load(sys.argv[1], backend="ort"), "m")
create_app(server)
server.batcher.start()
reqs = [server.batcher.submit(server.engine._text.encode([p])[0], GenerationSettings(max_new_tokens=6))
        for p in json.loads(sys.argv[2])]
print(json.dumps([r.result() for r in reqs]))
server.batcher.close()
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    proc = subprocess.run([sys.executable, "-c", code, str(art), json.dumps(PROMPTS)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eng = lowbit.load(art, backend="ort")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [eng.generate(p, max_new_tokens=6) for p in PROMPTS]
