"""The ONNX lowering's deferred weights (lowering/deferred.py): read when the model is written, block by block,
and the model written that way is the one written from weights in memory."""

import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit
from lowbit.lowering import deferred
from lowbit.lowering.deferred import Deferred, deferred_call
from lowbit.lowering.onnx.deferred_tensor import DeferredTensor
from lowbit.lowering.onnx.ort_ops import to_matmul_nbits
from lowbit.format.quantize import QuantSpec, pack_codes, quantize_weight

from tests.lowering.onnx.test_onnx import _check_parity


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_are_the_value(monkeypatch, transpose, dtype):
    """The blocks a Deferred writes, joined, are its whole value (transposed and converted as asked), in several
    blocks; a transpose that is not applied would not pass."""
    monkeypatch.setattr(deferred, "BLOCK_BYTES", 60)
    src = torch.randn(7, 7, dtype=torch.bfloat16)
    d = Deferred(src.shape, src.dtype, lambda: src).to(dtype)
    d = d.t() if transpose else d
    want = (src.t() if transpose else src).to(dtype)
    blocks = list(d.row_blocks())
    assert len(blocks) > 1 and all(b.is_contiguous() for b in blocks)
    assert torch.equal(torch.cat(blocks), want) and torch.equal(d.materialize(), want)
    assert tuple(d.shape) == tuple(want.shape) and d.dtype == dtype and d.stride() == want.contiguous().stride()
    if transpose:
        assert not torch.equal(torch.cat(list(d.t().row_blocks())), want)      # negative control: untransposed


def test_deferred_call_reads_the_weight_once_for_its_outputs():
    """A repack of a deferred weight: shapes now (meta), the repacked tensor when read, equal to the repack of the
    weight in memory; the small outputs (scales) are real at once."""
    g = torch.Generator().manual_seed(3)
    q, s, z = quantize_weight(torch.randn(16, 64, generator=g), QuantSpec(4, 32, False))
    qweight = pack_codes(q, 4)
    reads = []

    def read():
        reads.append(1)
        return qweight

    out = deferred_call(to_matmul_nbits, (Deferred(qweight.shape, qweight.dtype, read), s, z, 4, 32, 64))
    want = to_matmul_nbits(qweight, s, z, 4, 32, 64)
    assert not reads and isinstance(out["b"], Deferred) and torch.equal(out["scales"], want["scales"])
    assert torch.equal(out["zero_points"], want["zero_points"]) and out["block_size"] == want["block_size"]
    assert torch.equal(out["b"].materialize(), want["b"]) and len(reads) == 1


def _initializers(path) -> dict:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}


def _nodes(path) -> list:
    return [n.SerializeToString() for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("recipe", ["mix", "tied"])
def test_deferred_lowering_writes_the_same_model(model_dirs, tokenizer, tmp_path, monkeypatch, recipe):
    """Every tensor deferred and written in small blocks to external data, the ONNX model holds the same nodes and
    initializer bytes as when every tensor is read at once: quantized and W8A8 matmuls, a quantized embedding, a
    tied embedding and head sharing their tensors, float norms; ONNX Runtime runs it."""
    import lowbit.lowering.onnx.lower as lower_onnx
    from lowbit.passes.recipe import Recipe
    from lowbit.passes.settings import Scheme

    if recipe == "mix":
        chosen = tmp_path / "r.toml"
        chosen.write_text('name = "mix"\nbits = 4\ngroup_size = 32\nquantize_embeddings = true\n'
                          '[[overrides]]\npattern = "*.mlp.*"\nbits = 8\nsym = true\nact_bits = 8\n')
        chosen = str(chosen)
    else:
        chosen = Recipe("tied4", "rtn", Scheme(4, 32, quantize_lm_head=True, quantize_embeddings=True))
    monkeypatch.setattr(deferred, "DEFER_BYTES", 1 << 60)
    whole = lowbit.compile(str(model_dirs["llama"]), chosen, out=tmp_path / "whole", target="onnx", quiet=True)
    monkeypatch.setattr(deferred, "DEFER_BYTES", 0)
    monkeypatch.setattr(deferred, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(lower_onnx, "EXTERNAL_DATA_BYTES", 0)
    written = []
    tofile = DeferredTensor.tofile
    monkeypatch.setattr(DeferredTensor, "tofile", lambda self, f: written.append(self.name) or tofile(self, f))
    blocks = lowbit.compile(str(model_dirs["llama"]), chosen, out=tmp_path / "blocks", target="onnx", quiet=True)
    assert (blocks / "onnx" / "model.onnx.data").stat().st_size > 50_000 and len(written) > 5
    a, b = _initializers(whole / "onnx" / "model.onnx"), _initializers(blocks / "onnx" / "model.onnx")
    assert a == b and _nodes(whole / "onnx" / "model.onnx") == _nodes(blocks / "onnx" / "model.onnx")
    name = max(b, key=lambda k: len(b[k]))
    assert {**b, name: bytes(len(b[name]))} != a          # negative control: one changed tensor is seen
    _check_parity(blocks, tokenizer)
