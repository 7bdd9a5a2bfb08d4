"""ONNX Runtime's fused operators (compiler/onnx_fusions.py): which fire on which family, and the fused graph
computes what the plain one does."""

import pytest
import torch

import lowbit
from lowbit.format.artifact import read_manifest
from lowbit.runtime.inspect_artifact import describe

# arch -> the fusions that fire in a 2-block tiny model (rtn-w4g64): a skip norm per residual Add feeding a norm
# (Llama and GPT-2: every one, the last block's output meeting the final norm included; BERT's post-norm blocks:
# both Adds of each block), the erf GELU formula (BERT). OPT's Adds keep their plain ops but the last: OPT flattens
# the hidden states to [tokens, hidden] around its MLP, so a Reshape stands between the Add and the LayerNorm.
EXPECTED = {
    "llama": {"SkipSimplifiedLayerNormalization": 4},
    "opt": {"SkipLayerNormalization": 1},
    "gpt2": {"SkipLayerNormalization": 5},
    "bert": {"Gelu": 2, "SkipLayerNormalization": 4},
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_fused_and_plain_onnx_agree(arch, model_dirs, tmp_path):
    fused = lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "f", target="onnx", quiet=True)
    plain = lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "p", target="onnx", quiet=True,
                           onnx_fusions=False)
    mf, mp = read_manifest(fused)["onnx"], read_manifest(plain)["onnx"]
    assert {k: v for k, v in mf["fusions"].items() if v} == EXPECTED[arch]
    assert mp["fusions"] == {}
    shown = describe(fused)
    assert all(f"{op} x{n}" in shown for op, n in EXPECTED[arch].items()) and "ONNX Runtime fusions" in shown
    for op, n in EXPECTED[arch].items():
        assert mf["ops"].get(f"com.microsoft::{op}", mf["ops"].get(op)) == n, (op, mf["ops"])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 300, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ef, ep = lowbit.load(fused, backend="ort"), lowbit.load(plain, backend="ort")
    assert _rel(ef.forward(ids, mask), ep.forward(ids, mask)) < 1e-4
    if arch != "bert":
        assert ef.generate(["four bit weights"], max_new_tokens=8) == ep.generate(["four bit weights"], max_new_tokens=8)
