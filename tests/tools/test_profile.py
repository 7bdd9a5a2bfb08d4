"""lowbit profile (runtime/profiler.py): the statistics against numpy, the JSON document's keys, the table, and
bad input as one line and exit 2."""

import json

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from lowbit.tools.breakdown import KINDS
from lowbit.tools.profiler import SUM_TOLERANCE, format_table, stats, unexplained

STAT_KEYS = ["count", "mean", "std", "min", "p50", "p90", "p95", "p99", "max"]
RUN_KEYS = {"artifact", "recipe", "backend", "device", "batch", "prompt_len", "new_tokens", "iterations",
            "prefill_ms", "decode_ms_per_token", "e2e_ms", "tokens_per_s", "peak_memory_bytes",
            "weight_bytes_per_step", "bandwidth_gb_s"}


def test_stats_match_numpy():
    samples = np.random.default_rng(3).lognormal(1.0, 0.5, 257)
    s = stats(samples.tolist())
    assert list(s) == STAT_KEYS
    assert s["count"] == 257 and s["min"] == samples.min() and s["max"] == samples.max()
    assert s["mean"] == pytest.approx(samples.mean(), rel=1e-12) and s["std"] == pytest.approx(samples.std(), rel=1e-12)
    for q in (50, 90, 95, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(samples, q), rel=1e-12)
    # Negative control: the statistics of other samples differ.
    assert stats((samples * 1.01).tolist())["p90"] != pytest.approx(s["p90"], rel=1e-4)
    assert list(stats([1.0, 2.0], [10, 99.9])) == ["count", "mean", "std", "min", "p10", "p99.9", "max"]


@pytest.fixture(scope="module")
def tiny_artifacts(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return [lowbit.compile(str(model_dirs["llama"]), recipe, out=root / recipe, quiet=True)
            for recipe in ("fp", "rtn-w4g64")]


def test_profile_document_and_table(tiny_artifacts):
    doc = lowbit.profile(tiny_artifacts, batches=[1, 2], prompt_lens=[8], new_tokens=4, warmup_s=0,
                         iterations=3, quiet=True)
    assert set(doc) == {"lowbit_version", "host", "runs"}
    assert set(doc["host"]) == {"cpu", "gpu", "torch", "onnxruntime"}
    assert [(r["recipe"], r["batch"]) for r in doc["runs"]] == [("fp", 1), ("fp", 2), ("rtn-w4g64", 1),
                                                                ("rtn-w4g64", 2)]
    for r in doc["runs"]:
        assert set(r) == RUN_KEYS and r["backend"] == "torch" and r["iterations"] == 3
        assert list(r["prefill_ms"]) == STAT_KEYS and r["prefill_ms"]["count"] == 3
        assert r["decode_ms_per_token"]["count"] == 3 * 4 and r["e2e_ms"]["count"] == 3
        # One iteration's end-to-end time holds its prefill and its four steps.
        assert r["e2e_ms"]["min"] >= r["prefill_ms"]["min"] + 4 * r["decode_ms_per_token"]["min"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 4 / (r["e2e_ms"]["mean"] / 1e3))
        assert r["weight_bytes_per_step"] > 0 and r["bandwidth_gb_s"] > 0 and r["peak_memory_bytes"] >= 0
    fp, q = doc["runs"][0]["weight_bytes_per_step"], doc["runs"][2]["weight_bytes_per_step"]
    assert q < fp / 2                         # the 4-bit matmuls read a fraction of the float ones
    json.dumps(doc)
    table = format_table(doc)
    assert table.count("\n| ") == 5 and "1.00x" in table and "host:" in table


def test_profile_cli_json(tiny_artifacts, capsys):
    assert main(["profile", str(tiny_artifacts[1]), "--batch", "1", "--prompt-len", "6", "--new-tokens", "2",
                 "--warmup-s", "0", "--iterations", "2", "--percentiles", "50,99", "--json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (run,) = doc["runs"]
    assert list(run["decode_ms_per_token"]) == ["count", "mean", "std", "min", "p50", "p99", "max"]


@pytest.mark.parametrize("args,msg", [
    (["/no/such/artifact"], "artifact"),
    (["{art}", "--backend", "tpu"], "unknown backend"),
    (["{art}", "--batch", "0"], "batch 0"),
    (["{art}", "--batch", "one"], "--batch"),
    (["{art}", "--prompt-len", "100000"], "exceeds the model's context"),
    (["{art}", "--trace", "t.json"], "--per-layer"),
    (["{art}", "--prompt-len", "8,0"], "--prompt-len 0: a prompt needs at least one token"),
    (["{art}", "--batch", ","], "--batch ',': give at least one integer >= 1"),
    (["{art}", "--percentiles", "50,101"], "percentile 101.0 is outside 0..100"),
    (["{art}", "--plot", "{art}/manifest.json"], "--plot '{art}/manifest.json' is an existing file; give a folder"),
    (["{art}", "--per-layer", "--trace", "{art}"], "--trace '{art}' is an existing folder; give a file name"),
    (["{art}", "--trace", "{art}/manifest.json/t.json"], "cannot write under '{art}/manifest.json'"),
])
def test_profile_bad_input_is_one_line_and_exit_2(args, msg, tiny_artifacts, capsys):
    argv = ["profile", *[a.format(art=tiny_artifacts[0]) for a in args], "--new-tokens", "2", "--warmup-s", "0",
            "--iterations", "1", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg.format(art=tiny_artifacts[0]) in err[0], err


def test_encoder_profiles_its_forward_pass_and_refuses_decode(model_dirs, tmp_path, capsys):
    art = lowbit.compile(str(model_dirs["bert"]), "rtn-w4g64", out=tmp_path / "enc", quiet=True)
    (run,) = lowbit.profile(art, prompt_lens=[7], warmup_s=0, iterations=2, quiet=True)["runs"]
    assert run["new_tokens"] == 0 and run["decode_ms_per_token"] is None and run["tokens_per_s"] is None
    assert run["prefill_ms"]["count"] == 2
    assert main(["profile", str(art), "--new-tokens", "3", "--warmup-s", "0", "--iterations", "1", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder" in err[0], err


def test_sum_check_flags_a_breakdown_that_misses_the_step():
    rows = [{"phase": "decode", "name": "block 0", "kind": "norm", "ms": 3.0},
            {"phase": "decode", "name": "block 0", "kind": "quantized matmul", "ms": 6.5},
            {"phase": "decode", "name": "overhead", "kind": "overhead", "ms": 0.5}]
    assert unexplained(rows, {"decode": 10.0}) == {"decode": pytest.approx(0.05)}
    assert abs(unexplained(rows, {"decode": 10.0})["decode"]) <= SUM_TOLERANCE
    # Negative controls: rows that miss a third of the step, or add up to more than it, are outside the tolerance.
    assert unexplained(rows, {"decode": 15.0})["decode"] > SUM_TOLERANCE
    assert unexplained(rows, {"decode": 8.0})["decode"] < -SUM_TOLERANCE


def test_per_layer_breakdown_of_the_torch_backend(tiny_artifacts, tmp_path):
    doc = lowbit.profile(tiny_artifacts[1], backend="torch", prompt_lens=[8], new_tokens=3, warmup_s=0,
                         iterations=2, quiet=True, per_layer=True, trace=str(tmp_path / "t.json"),
                         plot_dir=str(tmp_path / "plots"))
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert any(e.get("name") == "block 0|quantized matmul" for e in events)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["breakdown.png", "latency_vs_batch.png",
                                                                       "latency_vs_prompt.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in ("breakdown.png",))
    (run,) = doc["runs"]
    for phase in ("prefill", "decode"):
        rows = [r for r in run["layers"] if r["phase"] == phase]
        assert all(set(r) == {"phase", "name", "kind", "ms", "percent"} for r in rows)
        names = list(dict.fromkeys(r["name"] for r in rows))
        assert names == ["embed", "block 0", "block 1", "head", "overhead"], names
        assert {r["kind"] for r in rows if r["name"] == "block 0"} >= {"quantized matmul", "attention", "norm"}
        assert {r["kind"] for r in rows if r["name"] == "head"} >= {"float matmul"}
        assert all(r["kind"] in KINDS for r in rows if r["name"] != "overhead")
        assert sum(r["percent"] for r in rows) == pytest.approx(100.0)
        assert run["layers_profiled_ms"][phase] > 0
    assert "one decode step by layer" in format_table(doc)


def test_per_layer_breakdown_of_onnx_runtime(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "onnx", target="onnx", quiet=True)
    (run,) = lowbit.profile(art, backend="ort", prompt_lens=[8], new_tokens=3, warmup_s=0, iterations=2,
                            quiet=True, per_layer=True)["runs"]
    for phase in ("prefill", "decode"):
        rows = [r for r in run["layers"] if r["phase"] == phase]
        names = list(dict.fromkeys(r["name"] for r in rows))
        assert names[-1] == "overhead" and {"block 0", "block 1", "head"} <= set(names), names
        kinds = {r["kind"] for r in rows if r["name"] == "block 1"}
        assert {"quantized matmul", "attention", "norm"} <= kinds, kinds      # MatMulNBits, GQA, skip norms
        assert sum(r["percent"] for r in rows) == pytest.approx(100.0)


def test_plot_without_matplotlib_is_one_line(tiny_artifacts, monkeypatch, tmp_path, capsys):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name, *a))
    assert main(["profile", str(tiny_artifacts[0]), "--plot", str(tmp_path / "p"), "--iterations", "1", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and not (tmp_path / "p").exists()
