"""The hf-gptq export, read back with an independent unpacking of the GPTQ layout."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from dataclasses import replace

from lowbit.passes.recipe import load_recipe
from lowbit.cli import main
from lowbit.compiler.pipeline import CalibrationArgs

from tests.conftest import dequantized_layers, sample_text


def read_gptq_layer(t: dict, name: str, bits: int) -> torch.Tensor:
    """Dequantize one layer from qweight/qzeros/scales/g_idx the way GPTQ readers do (float32 [N, K])."""
    f, mask = 32 // bits, (1 << bits) - 1
    qweight = t[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF        # [K/f, N] as unsigned words
    codes = torch.stack([(qweight >> (bits * j)) & mask for j in range(f)], dim=1).reshape(-1, qweight.shape[1])
    qzeros = t[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF          # [G, N/f]
    zeros = torch.stack([(qzeros >> (bits * j)) & mask for j in range(f)], dim=2).reshape(qzeros.shape[0], -1) + 1
    scales = t[f"{name}.scales"].float()                             # [G, N]
    g_idx = t[f"{name}.g_idx"].long()                                # [K]
    w = (codes - zeros[g_idx]).float() * scales[g_idx]               # [K, N]
    return w.t()


@pytest.mark.parametrize("recipe", ["gptq-w4g64", "rtn-w8g128", "ar-w4g64"])
def test_export_reads_back_bit_exactly(recipe, model_dirs, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(6000, 3))
    r = load_recipe(recipe)
    r = replace(r, scheme=replace(r.scheme, sym=True, group_size=64))          # GPTQ checkpoints are symmetric
    if r.lkd is not None:               # learnt rounding: its codes, learnt on the symmetric grid
        r = replace(r, lkd=replace(r.lkd, steps=20, samples=8, seq_len=48))
    kw = dict(calib=CalibrationArgs(str(calib), 8, 48), quiet=True)
    # fuse=False: the torch artifact keeps one tensor per layer, to compare layer by layer.
    ours = lowbit.compile(str(model_dirs["llama"]), r, out=tmp_path / "torch", fuse=False, **kw)
    exp = lowbit.compile(str(model_dirs["llama"]), r, out=tmp_path / "hf", target="hf-gptq", **kw)
    qc = json.loads((exp / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", r.scheme.bits, 64, True)
    assert qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    t = load_file(str(exp / "model.safetensors"))
    ref = dequantized_layers(ours)
    assert len(ref) == 14
    for name, w in ref.items():
        n, k = w.shape
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (k * r.scheme.bits // 32, n)
        assert t[f"{name}.qzeros"].shape == (-(-k // 64), n * r.scheme.bits // 32)
        assert t[f"{name}.scales"].shape == (-(-k // 64), n) and t[f"{name}.g_idx"].shape == (k,)
        assert torch.equal(read_gptq_layer(t, name, r.scheme.bits), w), name
    # The control: the stored zero points without GPTQ's "+ 1" miss by one step.
    name = next(iter(ref))
    t[f"{name}.qzeros"] = t[f"{name}.qzeros"] + sum(1 << (r.scheme.bits * j) for j in range(32 // r.scheme.bits))
    assert not torch.equal(read_gptq_layer(t, name, r.scheme.bits), ref[name])
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert (exp / "tokenizer.json").is_file()


def test_export_refuses_what_the_format_cannot_hold(model_dirs, tmp_path, capsys):
    for recipe, needle in (("rtn-w3g64", "hold 4 and 8-bit weights, not 3-bit; --target compressed-tensors can"),
                           ("fp", "needs quantized weights"),
                           ("gptq-w4g64", "only symmetric GPTQ (sym = true)"),
                           ("zq-w8a8", "weight-only")):
        code = main(["compile", str(model_dirs["llama"]), "-r", recipe, "-t", "hf-gptq", "-o", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
