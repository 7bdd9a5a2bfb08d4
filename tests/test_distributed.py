"""GPTQ calibration split over processes with torch.distributed (torchrun, gloo on CPU): the same codes as one
process, rank 0 alone writing the artifact, and what a split compile does not do refused before any collective."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit import distributed
from lowbit.compiler import pipeline
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.errors import LowbitError

from tests.conftest import sample_text


@pytest.mark.parametrize("n,world", [(16, 2), (17, 2), (5, 3), (3, 3), (128, 8)])
def test_each_sample_goes_to_exactly_one_rank(n, world):
    shares = [distributed.Ranks(r, world).share(n) for r in range(world)]
    assert [i for s in shares for i in range(n)[s]] == list(range(n))
    assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


def _codes(art) -> dict:
    return load_file(str(art / "weights.safetensors"))


def test_two_processes_give_the_codes_of_one(model_dirs, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(6000, 3))
    model = str(model_dirs["llama"])
    flags = ["-r", "gptq-w4g64", "--calib", str(calib), "--calib-samples", "16", "--calib-seq-len", "32", "-q"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lowbit", "compile", model, *flags, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines() == [str(tmp_path / "two")]          # printed by rank 0 only
    kw = dict(calib=CalibrationArgs(str(calib), 16, 32), quiet=True)
    one = lowbit.compile(model, "gptq-w4g64", out=tmp_path / "one", **kw)
    a, b = _codes(one), _codes(tmp_path / "two")
    assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a)
    # The Hessians are summed in another order (each process's share, then across processes): equal up to float
    # rounding, which on this model changes no code.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["calibration"]["processes"] == 2 and manifest["calibration"]["tokens"] == 16 * 32
    assert manifest["streamed"]               # every process reads the checkpoint block by block
    # Negative control: other calibration windows give other codes, which the comparison sees.
    other = lowbit.compile(model, "gptq-w4g64", out=tmp_path / "seed1",
                           calib=CalibrationArgs(str(calib), 16, 32, seed=1), quiet=True)
    c = _codes(other)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("qweight"))


@pytest.mark.parametrize("kw,needle", [
    (dict(recipe="gptq-w4g64", resume=True), "--resume is for one process"),
    (dict(recipe="zq-w8a8-lkd"), "distils (LKD), which runs in one process"),
    (dict(recipe="gptq-w4g64", calib=CalibrationArgs("demo", 1, 32)),
     "--calib-samples 1 is fewer than the 2 processes"),
])
def test_what_a_split_compile_refuses(kw, needle, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "join", lambda device: distributed.Ranks(0, 2))
    with pytest.raises(LowbitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        lowbit.compile(str(model_dirs["llama"]), out=tmp_path / "x", quiet=True, **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe,passes", [("rtn-w4g64", False), ("gptq-w4g64", True)])
def test_a_process_other_than_rank_0_runs_only_the_calibrated_pass(recipe, passes, model_dirs, tmp_path,
                                                                   monkeypatch):
    """A streaming RTN compile quantizes as rank 0 writes: the other processes have nothing to do (and write
    nothing); GPTQ's calibrated pass runs on every process (the control: the check sees a pass run)."""
    monkeypatch.setattr(distributed, "join", lambda device: distributed.Ranks(1, 2))
    ran = []
    monkeypatch.setattr(pipeline, "_quantize", lambda *a: ran.append(a[3].source is not None))
    out = lowbit.compile(str(model_dirs["llama"]), recipe, out=tmp_path / "x", quiet=True,
                         calib=CalibrationArgs("demo", 4, 32))
    assert out == tmp_path / "x" and not out.exists()
    assert ran == ([True] if passes else [])
