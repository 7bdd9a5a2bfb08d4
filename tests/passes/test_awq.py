"""Activation-aware scaling (passes/awq.py): the folds are exact in float on every tiny architecture and wrong
without their carrier; the search minimizes the output error it defines and never loses to no scaling; recipes
with awq compile, record their folds, and are refused where a target cannot hold them."""

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.format.quantize import QuantSpec, fake_quantize
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.awq import apply_fold, channel_scales, find_folds, output_error, search
from lowbit.passes.recipe import load_recipe

from tests.conftest import CAUSAL, MORE_CAUSAL, make_model

# Sets of matmuls scaled per model (2 blocks, lm_head float): a norm's readers (Q/K/V or fused QKV; gate/up, or the
# first matmul of a non-gated MLP), a gated MLP's down projection (up's rows carry it) and the attention output
# projection where a separate value projection makes its input (BERT's too). Not scaled: GELU MLPs' second matmul,
# values sliced from a fused QKV (GPT-2, GPT-NeoX, BLOOM, Falcon, Phi-3) or otherwise reshaped (StableLM), Phi-3's
# fused gate_up (split by chunk), BERT's post-norm outputs (the residual stream reads them too); where attention
# and MLP read one norm (Falcon, GPT-J, Phi-2) they are one set.
FOLDS = {"llama": 8, "qwen2": 8, "opt": 6, "gpt2": 4, "mistral": 8, "qwen3": 8, "phi3": 4, "gemma": 8,
         "gemma3_text": 8, "stablelm": 6, "gpt_neox": 4, "bloom": 4, "falcon": 2, "gptj": 4, "phi": 4, "bert": 2}
ALL = [*CAUSAL, *MORE_CAUSAL, "bert"]
HEAD = load_recipe("awq-w4g64")


def _graph(arch):
    model = make_model(arch)
    task = "encoder" if arch == "bert" else "causal-lm"
    return trace(LoadedModel(model, None, model.config, None, task))


def _logits(graph):
    ids = torch.randint(2, graph.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return graph(ids, torch.ones_like(ids)).float()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ALL)
def test_folds_are_exact_in_float(arch):
    """Random scales (e^N(0, 1/4) per channel) on every fold leave the float logits unchanged to float32 rounding;
    the control divides nothing (weights scaled, carrier not) and moves them."""
    graph = _graph(arch)
    folds, _ = find_folds(graph, load_recipe("rtn-w4g64"))
    assert len(folds) == FOLDS[arch], [f.name for f in folds]
    if not folds:
        return
    before = _logits(graph)
    gen = torch.Generator().manual_seed(1)
    # A value fold's channels that read one value head share its scale (grouped-query attention).
    scales = [torch.exp(0.5 * torch.randn(f.sites[0].in_features, generator=gen)) for f in folds]
    scales = [s if f.carrier[0] != "values" else s[f.carrier[2]] for f, s in zip(folds, scales)]
    for fold, s in zip(folds, scales):
        apply_fold(graph, fold, s)
    assert _rel(_logits(graph), before) < 1e-5

    control = _graph(arch)
    for fold, s in zip(find_folds(control, load_recipe("rtn-w4g64"))[0], scales):
        for site in fold.sites:
            w = control.attr(site.weight_attr)
            control.set_constant(site.weight_attr, w * (s[:, None] if site.weight_is_kn else s[None, :]))
    assert _rel(_logits(control), before) > 1e-2


def test_grouped_values_share_their_scale():
    """Control for the value folds' channel map: on a grouped-query model (4 query heads over 2 value heads) scales
    that differ between heads sharing a value head change the logits, so a fold cannot give them their own."""
    graph = _graph("llama")
    before = _logits(graph)
    folds = [f for f in find_folds(graph, load_recipe("rtn-w4g64"))[0] if f.carrier[0] == "values"]
    assert folds
    gen = torch.Generator().manual_seed(2)
    for fold in folds:
        apply_fold(graph, fold, torch.exp(0.5 * torch.randn(fold.sites[0].in_features, generator=gen)))
    assert _rel(_logits(graph), before) > 1e-2


def test_search_minimizes_the_output_error():
    """output_error is the squared output error on the calibration tokens (2/n X^T X weighting); alpha 0 is the
    plain quantizer; on activations with a few large channels the search picks alpha > 0 and lowers the error."""
    gen = torch.Generator().manual_seed(0)
    k, n, tokens = 64, 48, 512
    x = torch.randn(tokens, k, generator=gen)
    x[:, :4] *= 20                                    # outlier channels, as in LLM activations
    h = 2 / tokens * x.t() @ x
    w = torch.randn(n, k, generator=gen)
    spec = QuantSpec(4, 32)
    s = channel_scales(h, 0.5)
    direct = float(((x @ (w - fake_quantize(w * s, spec) / s).t()) ** 2).sum() * 2 / tokens)
    assert output_error(w, spec, s, h) == pytest.approx(direct, rel=1e-4)
    assert torch.allclose(channel_scales(h, 0.0), torch.ones(k))
    found = search(h, [w], [spec])
    assert found["plain_error"] == pytest.approx(output_error(w, spec, torch.ones(k), h), rel=1e-5)
    assert found["alpha"] > 0 and found["error"] < 0.9 * found["plain_error"]


def test_awq_compiles_and_records_its_folds(model_dirs, tmp_path):
    """awq-w4g64 (RTN) and awq-gptq-w4g64 compile a tiny Llama; the manifest names every scaled set with its alpha
    and errors (never above alpha 0's) and the unscaled inputs by reason; outputs stay near the float model's."""
    from tests.conftest import sample_text

    text = tmp_path / "calib.txt"
    text.write_text(sample_text(3000, 2))
    calib = CalibrationArgs(str(text), samples=4, seq_len=32)
    for recipe in ("awq-w4g64", "awq-gptq-w4g64"):
        out = lowbit.compile(model_dirs["llama"], recipe=recipe, out=tmp_path / recipe, quiet=True, calib=calib)
        m = json.loads((out / "manifest.json").read_text())
        folds = m["awq"]["folds"]
        assert len(folds) == FOLDS["llama"] and m["calibration"]["tokens"] == 4 * 32
        assert all(0 <= f["alpha"] <= 1 and f["error"] <= f["plain_error"] for f in folds.values())
        assert m["awq"]["max_rel_diff"] < 1e-4 and m["recipe"]["awq"] is True
        model = lowbit.load(out)
        ids = torch.randint(2, 200, (1, 12), generator=torch.Generator().manual_seed(4))
        ref = lowbit.load(lowbit.compile(model_dirs["llama"], recipe="fp", out=tmp_path / f"fp-{recipe}",
                                         quiet=True))
        assert _rel(model.forward(ids).float(), ref.forward(ids).float()) < 0.5
    # The ONNX target lowers from the same scaled graph: ONNX Runtime's logits are the torch reference kernels'.
    onnx = lowbit.compile(model_dirs["llama"], recipe="awq-w4g64", target="onnx", out=tmp_path / "onnx", quiet=True,
                          calib=calib)
    torch_logits = lowbit.load(onnx, backend="torch", kernels="reference").forward(ids).float()
    assert _rel(torch.as_tensor(lowbit.load(onnx, backend="ort").forward(ids)).float(), torch_logits) < 1e-3


def test_awq_refusals(model_dirs, tmp_path, capsys):
    """A recipe file with awq on a float method and awq with lkd are refused; one line each, nothing left behind.
    An export refuses an awq recipe only for its scheme, naming the exports that hold it."""
    before = set(tmp_path.iterdir())
    code = main(["compile", str(model_dirs["llama"]), "-o", str(tmp_path / "o"), "-r", "awq-gptq-w4g64",
                 "--target", "hf-gptq"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sym = true" in err[0] and "--target hf-awq" in err[0], err
    bad = tmp_path / "fp.toml"
    bad.write_text('method = "fp"\nawq = true\n')
    code = main(["compile", str(model_dirs["llama"]), "-o", str(tmp_path / "o"), "-r", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "awq = true" in err[0], err
    both = tmp_path / "both.toml"
    both.write_text('method = "rtn"\nawq = true\nlkd = true\n')
    code = main(["compile", str(model_dirs["llama"]), "-o", str(tmp_path / "o"), "-r", str(both)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "awq and lkd" in err[0], err
    assert set(tmp_path.iterdir()) == before | {bad, both}
