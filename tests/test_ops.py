"""lowbit:: custom ops: reference kernel against float math, fake kernel under torch.export."""

import pytest
import torch
import torch.nn.functional as F

import lowbit.ops  # noqa: F401  (registers the lowbit:: ops)
from lowbit.format.quantize import QuantSpec, dequantize_codes, pack_codes, quantize_weight


def _layer(n, k, bits, group, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    spec = QuantSpec(bits, group)
    q, s, z = quantize_weight(w, spec)
    b = torch.randn(n, generator=g) if bias else None
    return pack_codes(q, bits), s, z, b, dequantize_codes(q, s, z, spec.group(k)), spec.group(k)


@pytest.mark.parametrize("bits,group,k", [(4, 128, 576), (4, 64, 100), (3, 64, 576), (8, 0, 96), (2, 32, 70)])
def test_wna16_linear_matches_float_reference(bits, group, k):
    qw, s, z, b, w_ref, g = _layer(48, k, bits, group, seed=bits * 7 + k)
    x = torch.randn(3, 5, k)
    y = torch.ops.lowbit.wna16_linear(x, qw, s, z, b, bits, g, k)
    ref = F.linear(x.double(), w_ref.double(), b.double()).float()
    assert y.shape == (3, 5, 48)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    # The tolerance is tight enough that a neighbouring code in one column fails it.
    w_bad = w_ref.clone()
    w_bad[:, 0] += s[:, 0].float()
    assert not torch.allclose(F.linear(x, w_bad, b), ref, rtol=1e-5, atol=1e-4)


def test_wna16_linear_half_precision_input():
    qw, s, z, b, w_ref, g = _layer(32, 128, 4, 64, seed=3)
    x = torch.randn(4, 128)
    y = torch.ops.lowbit.wna16_linear(x.to(torch.bfloat16), qw, s, z, b, 4, g, 128)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.to(torch.bfloat16).float(), w_ref, b)
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_wna16_linear_traces_with_export():
    qw, s, z, b, w_ref, g = _layer(16, 64, 4, 32, seed=5)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.lowbit.wna16_linear(x, qw, s, z, b, 4, g, 64)

    ep = torch.export.export(M(), (torch.randn(2, 64),),
                             dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    assert any("wna16_linear" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(7, 64)
    assert torch.allclose(ep.module()(x), F.linear(x, w_ref, b), atol=1e-4)


def test_linear_ops_pass_opcheck_and_compile():
    """The ops' schemas, fake kernels and dispatch registrations hold up (torch.library.opcheck), and a function
    calling them compiles with torch.compile(fullgraph=True) to the same result: the contract the CUDA kernels
    plug into."""
    torch._dynamo.reset()
    qw, s, z, b, _, g = _layer(40, 96, 4, 32, seed=5)
    x = torch.randn(2, 7, 96)
    sym = QuantSpec(8, 32, sym=True)
    q8, s8, z8 = quantize_weight(torch.randn(40, 96), sym)
    cases = [(torch.ops.lowbit.wna16_linear, (x, qw, s, z, b, 4, g, 96)),
             (torch.ops.lowbit.w8a8_linear, (x, pack_codes(q8, 8), s8, z8, b, 8, 32, 96))]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor",
                                                            "test_aot_dispatch_dynamic"))

        def f(t, op=op, args=args):
            return op(t * 2.0, *args[1:]).relu()

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
        assert torch.equal(compiled(x), f(x))
        x2 = torch.randn(3, 5, 96)              # another shape: the dynamic graph, no recompile needed
        assert torch.equal(compiled(x2), f(x2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_linear_ops_replay_in_cuda_graphs():
    """On a GPU the ops run their Triton kernels; after one eager call (autotuning happens there) they capture
    into a CUDA graph, and replays with new inputs copied in give the eager results bit for bit: no host syncs,
    no allocations outside the graph's pool, and split-K's tile counters back at zero after every launch (the
    sum of the splits is taken in a fixed order, so it does not vary from run to run)."""
    torch.manual_seed(0)
    qw, s, z, b, _, g = _layer(96, 256, 4, 128, seed=7)
    sym = QuantSpec(8, 0, sym=True)
    q8, s8, z8 = quantize_weight(torch.randn(96, 256), sym)
    cases = [(torch.ops.lowbit.wna16_linear, (qw, s, z, b, 4, g, 256)),
             (torch.ops.lowbit.w8a8_linear, (pack_codes(q8, 8), s8, z8, b, 8, 256, 256))]
    for op, args in cases:
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        for m in (1, 80):                                       # the split-K and the tiled launch
            static_x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
            op(static_x, *cuda_args)                             # autotune outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = op(static_x, *cuda_args)
            for _ in range(2):
                x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
                static_x.copy_(x)
                graph.replay()
                eager = op(x, *cuda_args)
                ref = op(x.cpu().float(), *args).half()          # the CPU reference kernel
                torch.cuda.synchronize()
                assert torch.equal(static_y, eager), (op, m)
                assert torch.allclose(static_y.cpu().float(), ref.float(), rtol=1e-2, atol=1e-2), (op, m)
    from lowbit.kernels.triton import w4a16

    assert not w4a16._COUNTERS[static_x.device].any()


def test_fusion_ops_equal_their_unfused_forms():
    """The ops the fusion rules substitute compute exactly what they replace (and pass opcheck): norm + per-token
    INT8 then ``w8a8_linear_codes`` == norm then ``w8a8_linear``; ``attention`` == sdpa with its heads grouped."""
    from lowbit.ops import quantize_rows_int8, rms_norm_reference

    g = torch.Generator().manual_seed(11)
    x, w_norm, b_norm = torch.randn(2, 5, 96, generator=g), torch.randn(96, generator=g), torch.randn(96, generator=g)
    q8, s8, z8 = quantize_weight(torch.randn(40, 96, generator=g), QuantSpec(8, 32, sym=True))
    layer = (pack_codes(q8, 8), s8, z8, torch.randn(40, generator=g), 8, 32, 96)
    for fused, normed in ((torch.ops.lowbit.rmsnorm_quant_int8(x, w_norm, 1e-6), rms_norm_reference(x, w_norm, 1e-6)),
                          (torch.ops.lowbit.layernorm_quant_int8(x, w_norm, b_norm, 1e-5),
                           F.layer_norm(x, (96,), w_norm, b_norm, 1e-5))):
        assert all(torch.equal(a, b) for a, b in zip(fused, quantize_rows_int8(normed)))
        y = torch.ops.lowbit.w8a8_linear_codes(*fused, *layer, torch.float32)
        assert torch.equal(y, torch.ops.lowbit.w8a8_linear(normed, *layer))
        # Negative control: codes of another row scale give another result.
        assert not torch.equal(torch.ops.lowbit.w8a8_linear_codes(fused[0], fused[1] * 2, *layer, torch.float32), y)
    torch.library.opcheck(torch.ops.lowbit.w8a8_linear_codes.default, (*fused, *layer, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    # act(gate) * up on the merged gate/up output, and the same quantized, feeding the W8A8 down projection.
    y = torch.randn(2, 5, 192, generator=g)
    for act, fn in (("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        prod = fn(y[..., :96]) * y[..., 96:]
        assert torch.equal(torch.ops.lowbit.act_mul(y, act), prod)
        fused = torch.ops.lowbit.act_mul_quant_int8(y, act)
        assert all(torch.equal(a, b) for a, b in zip(fused, quantize_rows_int8(prod)))
        assert torch.equal(torch.ops.lowbit.w8a8_linear_codes(*fused, *layer, torch.float32),
                           torch.ops.lowbit.w8a8_linear(prod, *layer))
    # Negative control: the halves swapped are another product.
    assert not torch.allclose(torch.ops.lowbit.act_mul(torch.cat([y[..., 96:], y[..., :96]], -1), "silu"),
                              torch.ops.lowbit.act_mul(y, "silu"))
    for op in (torch.ops.lowbit.act_mul.default, torch.ops.lowbit.act_mul_quant_int8.default):
        torch.library.opcheck(op, (y, "silu"), test_utils=("test_schema", "test_faketensor"))
    q, k, v = torch.randn(2, 6, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None]
    out = torch.ops.lowbit.attention(q, k, v, mask, 0.25, 3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask,
                                         scale=0.25)
    assert out.shape == (2, 3, 6, 16) and torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    torch.library.opcheck(torch.ops.lowbit.attention.default, (q, k, v, mask, 0.25, 3),
                          test_utils=("test_schema", "test_faketensor"))


def test_rotate_is_the_dense_rotation():
    """lowbit::rotate equals x @ diag(signs) (left^T (x) right) computed densely, in float64 and float16 inputs;
    the control: left not transposed is another rotation. Operands that do not fit are refused."""
    from lowbit.passes.rotate import orthogonal_parts

    g = torch.Generator().manual_seed(7)
    signs, r, h = orthogonal_parts(96)                    # 96 = 3 x 32
    x = torch.randn(2, 5, 96, generator=g, dtype=torch.float64)
    q = signs[:, None] * torch.kron(r, h)
    y = torch.ops.lowbit.rotate(x, signs, r.t().contiguous(), h)
    assert torch.allclose(y, x @ q, atol=1e-12) and torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(torch.ops.lowbit.rotate(x, signs, r, h), x @ q, atol=1e-3)
    half = torch.ops.lowbit.rotate(x.half(), signs.float(), r.t().float(), h.float())
    assert half.dtype == torch.float16 and torch.allclose(half.double(), x @ q, atol=2e-2)
    with pytest.raises(ValueError, match="do not rotate a last dimension of 96"):
        torch.ops.lowbit.rotate(x, signs, r.t(), h[:16, :16])
    torch.library.opcheck(torch.ops.lowbit.rotate.default, (x.float(), signs.float(), r.t().float(), h.float()),
                          test_utils=("test_schema", "test_faketensor"))
