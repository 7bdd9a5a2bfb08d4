"""The real demo model (SmolLM2-135M) and text: perplexity protocol and RTN 4-bit quality.

These need the demo assets (`lowbit assets`, done by `make test`); without them they skip.
"""

import math
import os

import pytest
import torch

import lowbit
from lowbit.tools.eval import evaluate_perplexity

SEQ, WINDOWS = 512, 4


def _assets():
    from lowbit.demo.assets import lowbit_home

    if not (lowbit_home() / "assets.json").is_file():
        return None
    from lowbit.demo.assets import ensure_assets

    paths = ensure_assets(quiet=True)
    return paths if all(os.path.exists(p) for p in paths.values()) else None


ASSETS = _assets()
# One xdist worker runs them all (make test: --dist loadgroup), so the demo compiles once.
pytestmark = [pytest.mark.skipif(ASSETS is None, reason="demo assets missing: run 'lowbit assets' (make test does)"),
              pytest.mark.xdist_group("demo"), pytest.mark.slow]


# Session scope: xdist may run other modules' tests between these on their worker, which would tear down a
# module-scoped fixture and compile the demo again.
@pytest.fixture(scope="session")
def fp_result():
    return evaluate_perplexity("demo", "demo", seq_len=SEQ, max_windows=WINDOWS, show_progress=False)


def test_fp_perplexity_equals_independent_transformers(fp_result):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS["model"])
    model = AutoModelForCausalLM.from_pretrained(ASSETS["model"]).eval()
    with open(ASSETS["eval"], encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    losses = []
    for w in range(WINDOWS):
        chunk = torch.tensor([ids[w * SEQ:(w + 1) * SEQ]])
        with torch.no_grad():
            losses.append(float(model(input_ids=chunk, labels=chunk).loss))
    ref = math.exp(sum(losses) / len(losses))
    assert fp_result["windows"] == WINDOWS and fp_result["tokens"] == WINDOWS * (SEQ - 1)
    assert abs(fp_result["ppl"] / ref - 1) < 0.005
    assert 5 < ref < 60                     # a real small LM on real English text


@pytest.fixture(scope="session")
def w4_onnx(tmp_path_factory):
    """rtn-w4g64 for the ONNX target: the program both backends run, compiled once for the tests below."""
    return lowbit.compile("demo", "rtn-w4g64", out=tmp_path_factory.mktemp("demo") / "w4", target="onnx",
                          quiet=True)


def test_rtn_w4g64_quality_and_generation(fp_result, w4_onnx):
    art = w4_onnx
    q = evaluate_perplexity(str(art), "demo", seq_len=SEQ, max_windows=WINDOWS, show_progress=False)
    ratio = q["ppl"] / fp_result["ppl"]
    assert 1.0 < ratio < 1.6, ratio         # 4-bit costs a little, never a collapse
    eng = lowbit.load(art)
    text = eng.generate("The capital of France is", max_new_tokens=12)
    assert len(text.split()) >= 2
    sizes = lowbit.format.artifact.read_manifest(art)["sizes"]
    assert sizes["quantized_bytes_after"] < sizes["quantized_bytes_before"] / 6   # fp32 -> ~4.4 bits
    assert sizes["matmul_bytes_after"] < sizes["matmul_bytes_before"] / 2         # lm_head stays float
    # The shipped program's fusions in every one of the 30 blocks.
    fired = {k: v["fired"] for k, v in lowbit.format.artifact.read_manifest(art)["rules"].items()}
    assert fired == {"merge_sibling_matmuls": 60, "norm_quant_int8": 0, "act_mul": 30, "residual_add": 60}


def test_onnx_int4_parity_on_demo(w4_onnx):
    """The real model through ONNX Runtime: same perplexity (0.5%) and the same 32 greedy tokens as torch."""
    art = w4_onnx
    ppl = {b: evaluate_perplexity(str(art), "demo", seq_len=SEQ, max_windows=2, show_progress=False,
                                  backend=b)["ppl"] for b in ("torch", "ort")}
    assert abs(ppl["ort"] / ppl["torch"] - 1) < 0.005, ppl
    prompts = ["The theory of relativity was developed by", "The capital city of France is"]
    # The torch side with its reference kernels, the oracle: its CPU kernels decode in bfloat16.
    gen = {b: lowbit.load(art, backend=b, **({"kernels": "reference"} if b == "torch" else {}))
           .generate(prompts, max_new_tokens=32, stop_at_eos=False) for b in ("torch", "ort")}
    assert gen["torch"] == gen["ort"]
    m = lowbit.format.artifact.read_manifest(art)
    # Lowered from the shipped program: Q/K/V and gate/up are one MatMulNBits each in all 30 blocks (210 unmerged).
    assert m["onnx"]["ops"]["com.microsoft::MatMulNBits"] == 30 * 4


# Windows of 256 tokens and the bar on the perplexity ratio. Both sides compute the same float32 math, so they
# differ by rounding. Weight-only INT4 passes that on unchanged: one window, 0.5%. Per-token INT8 activations
# amplify it: 1e-6 relative noise on the torch backend's own embeddings moves one window's zq-w8a8 perplexity by
# up to 3.7% (1.7% typical) and the mean of 8 windows by up to 0.44% (3 draws; python -m bench.parity_noise), so
# W8A8 is held to 2% over 4 windows, still several standard deviations of that noise's mean over 4 (+0.14% over 8
# on an AVX-512/AMX Xeon, where one window differed by 1.06% and failed the 0.5% this test once held it to). Four,
# not eight: the plugins' Python references take about 7 s a window under ONNX Runtime.
@pytest.mark.parametrize("recipe,windows,bar", [("rtn-w4g64", 1, 0.005), ("zq-w8a8", 4, 0.02)])
def test_tensorrt_onnx_perplexity_on_demo(recipe, windows, bar, tmp_path):
    """The TensorRT target on the real model: its ONNX (native INT4 DequantizeLinear with the asymmetric zero points
    folded, which symmetric weights skip; W8A8 plugins on their reference implementations) in ONNX Runtime scores
    the perplexity of the torch backend of the same artifact. float32, so the comparison is of the lowering, not
    of float16 (bench.tensorrt_onnx measures both, GPTQ too)."""
    art = lowbit.compile("demo", recipe, out=tmp_path / recipe, target="tensorrt", quiet=True,
                         trt_precision="float32")
    ppl = {b: evaluate_perplexity(str(art), "demo", seq_len=256, max_windows=windows, show_progress=False,
                                  backend=b)["ppl"] for b in ("torch", "ort")}
    assert abs(ppl["ort"] / ppl["torch"] - 1) < bar, ppl
    info = lowbit.format.artifact.read_manifest(art)["tensorrt"]
    if recipe == "zq-w8a8":
        assert info["plugins"]["int8_linear"] == 30 * 4 and info["plugins"]["rmsnorm_quant_int8"] == 30 * 2
    else:
        assert info["int4_weights"] == 30 * 4 and not info["plugins"]
