"""lowbit --version and lowbit doctor: what it reports of this machine is true, and what it concludes about
targets and backends follows from what is installed (fed in, so every branch runs here)."""

import importlib.metadata as metadata
import json
import subprocess
import sys

import pytest

import lowbit
from lowbit.cli import main
from lowbit.targets import BACKENDS, TARGETS
from lowbit.tools.doctor import PACKAGES, format_report, report, usability

EVERYTHING = {p.module: "99.0" for p in PACKAGES}
GPU = {"cuda_build": "12.8", "devices": [{"name": "H100", "capability": [9, 0], "memory_gib": 79.6}],
       "int4pack": True}
CUDA_ORT = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


def test_doctor_reports_this_machine(capsys):
    assert main(["doctor", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    versions = {p["name"]: p["version"] for p in doc["packages"]}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "triton"):
        assert versions[dist] == metadata.version(dist)
    assert versions["tensorrt"] is None or versions["tensorrt"] == metadata.version("tensorrt")
    assert set(doc["targets"]) == set(TARGETS) and set(doc["backends"]) == set(BACKENDS)
    assert doc["targets"]["torch"]["ok"] and doc["backends"]["torch"]["ok"] and doc["backends"]["ort"]["ok"]
    assert "CPUExecutionProvider" in doc["onnxruntime"]["providers"]
    assert doc["cpu"]["cores"] >= 1 and doc["lowbit"] == lowbit.__version__
    import torch

    assert len(doc["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    text = format_report(doc)
    for line in ("package", "CPU", "CUDA", "targets (lowbit compile --target)", "backends (lowbit run --backend)"):
        assert line in text
    assert len(text.splitlines()) < 50                          # one screen


def test_doctor_command_runs_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"lowbit {lowbit.__version__}"), out.stderr[-2000:]


def test_everything_present_on_a_gpu_machine():
    use = usability({**EVERYTHING, "tensorrt": "10.8.0"}, GPU, CUDA_ORT)
    assert all(ok for ok, _ in use["targets"].values()) and all(ok for ok, _ in use["backends"].values())
    assert "the engine builds here" in use["targets"]["tensorrt"][1]
    assert "Triton kernels" in use["backends"]["torch"][1]


@pytest.mark.parametrize("change,where,expected", [
    ({"tensorrt": None}, "tensorrt", "tensorrt is not installed"),
    ({"tensorrt": "10.3.0"}, "tensorrt", "older than 10.7"),
    ({"onnxruntime": None}, "ort", "needs onnxruntime"),
    ({"torch": None}, "torch", "needs torch"),
])
def test_a_missing_package_says_why(change, where, expected):
    """Negative controls: each missing or too old package turns its backend to NO with the reason."""
    use = usability({**EVERYTHING, "tensorrt": "10.8.0", **change}, GPU, CUDA_ORT)
    ok, detail = use["backends"][where]
    assert not ok and expected in detail, detail


def test_cpu_only_machine():
    cpu = {"cuda_build": None, "devices": [], "int4pack": True}
    use = usability({**EVERYTHING, "tensorrt": None}, cpu, {"providers": ["CPUExecutionProvider"]})
    assert use["backends"]["torch"][0] and "torch is a CPU build" in use["backends"]["torch"][1]
    assert "no CUDA provider" in use["backends"]["ort"][1]
    assert use["targets"]["tensorrt"][0] and "no engine here" in use["targets"]["tensorrt"][1]
    assert not use["backends"]["tensorrt"][0]
    old_gpu = {"cuda_build": "12.8", "devices": [{"name": "T4", "capability": [7, 5], "memory_gib": 15}]}
    assert "sm80 or newer" in usability({**EVERYTHING, "tensorrt": "10.8.0"}, old_gpu, CUDA_ORT)["backends"][
        "tensorrt"][1]


def test_a_package_that_fails_to_import_blocks_what_needs_it():
    use = usability(EVERYTHING, {"error": "OSError: libtorch_cpu.so: cannot open"}, CUDA_ORT)
    for kind, name in (("targets", "torch"), ("targets", "onnx"), ("backends", "torch")):
        ok, detail = use[kind][name]
        assert not ok and "torch fails to import" in detail, (kind, name, detail)
    assert use["backends"]["ort"][0]


def test_doctor_runs_without_torch():
    """The torch-free runtime's machines: doctor still reports, torch's targets and backend say NO."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lowbit.tools.doctor import report\n"
            "doc = report(); print(doc['backends']['torch']['ok'], doc['backends']['ort']['ok'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_report_is_plain_data():
    json.dumps(report())
