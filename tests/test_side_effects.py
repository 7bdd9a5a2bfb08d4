"""A library leaves the process as it found it: compiling and running artifacts through ``lowbit.compile`` /
``lowbit.load`` changes no environment variable, warning filter, logger level, transformers setting, torch global
or standard stream of the application that calls them (the CLI may: it owns its process)."""

import logging
import os
import sys
import warnings

import torch

import lowbit

LOGGERS = ("torch._export", "torch.onnx", "torch", "transformers", "onnxscript", "lowbit")


def process_state() -> dict:
    from transformers.utils import logging as hf_logging

    return {"env": dict(os.environ), "warning filters": list(warnings.filters), "stdout": sys.stdout,
            "stderr": sys.stderr, "transformers verbosity": hf_logging.get_verbosity(),
            "transformers bars": hf_logging.is_progress_bar_enabled(),
            "loggers": {n: logging.getLogger(n).level for n in LOGGERS}, "threads": torch.get_num_threads(),
            "grad": torch.is_grad_enabled(), "default dtype": torch.get_default_dtype()}


def changed(before: dict, after: dict) -> list:
    return [k for k in before if before[k] != after[k]]


def test_compile_and_run_leave_the_process_alone(model_dirs, tmp_path):
    before = process_state()
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "torch", quiet=True)
    onnx_art = lowbit.compile(str(model_dirs["llama"]), "zq-w8a8", out=tmp_path / "onnx", target="onnx",
                              onnx_exporter="torch.onnx", quiet=True)
    for path in (art, onnx_art):
        lowbit.load(path).generate("the model reads", max_new_tokens=3)
    assert changed(before, process_state()) == []


def test_state_check_can_fail():
    """Negative control: what quiet_transformers used to do for the whole process is seen."""
    from transformers.utils import logging as hf_logging

    before = process_state()
    verbosity = hf_logging.get_verbosity()
    os.environ["HF_HUB_OFFLINE_TEST_PROBE"] = "1"
    hf_logging.set_verbosity(logging.CRITICAL if verbosity != logging.CRITICAL else logging.INFO)
    try:
        assert changed(before, process_state()) == ["env", "transformers verbosity", "loggers"]
    finally:
        hf_logging.set_verbosity(verbosity)
        del os.environ["HF_HUB_OFFLINE_TEST_PROBE"]
