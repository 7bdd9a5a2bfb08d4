"""ONNX translations of the ops a lowered program holds, written once against an opset object (``op.Mul(a, b)``
builds a node): onnxscript's, for ``torch.onnx.export``'s ``custom_translation_table``, or lowbit's own ONNX
emitter's (``lowering.onnx.fx_onnx``).

- ``ort_matmul_nbits``      -> ``com.microsoft::MatMulNBits``
- ``ort_matmul_a8``         -> per-token INT8 quantization + ``MatMulInteger`` + row/column rescale (W8A8)
- ``ort_matmul_a8_codes``   -> the same on activations quantized already (after a fused norm + quantize)
- ``ort_gather_nbits``      -> ``com.microsoft::GatherBlockQuantized``
- ``attention``             -> MatMul / Softmax / MatMul, grouped-query heads as a broadcast (no K/V copies)
- ``rmsnorm_quant_int8``, ``layernorm_quant_int8`` -> the norm, then the per-token INT8 quantization
- ``act_mul``, ``act_mul_quant_int8`` -> ``Split``, the activation (SiLU as ``x * Sigmoid(x)``, GELU by its
  erf or tanh formula), ``Mul``; then the per-token INT8 quantization
- ``rotate``                -> ``Mul`` by the signs, ``Reshape`` to m x p blocks, ``MatMul`` left and right,
  ``Reshape`` back

The quantization steps are those of ``ops.quantize_rows_int8`` (float32 max|x| / 127 floored at
ACT_EPS, divide, round half to even, clip), so ONNX Runtime computes the same codes as the torch runtime.
"""

from __future__ import annotations

import torch

from lowbit.lowering.onnx.ort_ops import A_ZERO_U8, CONTRIB_DOMAIN, register_contrib_schemas
from lowbit.ops import ACT_EPS, ACT_QMAX

# A masked-out score: the most negative float32, not -inf, so a row with every key masked (a left-padding
# query) softmaxes to a uniform row instead of NaNs that would reach the cache.
MASKED_SCORE = float(torch.finfo(torch.float32).min)


def translations() -> dict:
    """The ``custom_translation_table`` (imports onnx and onnxscript on first use)."""
    from onnxscript import opset18
    from onnxscript.values import Opset

    register_contrib_schemas()
    return lowbit_op_functions(opset18, Opset(CONTRIB_DOMAIN, 1))


def _float32(op):
    return lambda v: op.Constant(value_float=float(v))


def activation(op, x, act: str, scalar=None):
    """``act`` (silu, gelu, gelu_tanh) of ``x``: SiLU as ``x * Sigmoid(x)``, GELU by its erf or tanh formula.
    ``scalar(v)``: a constant of x's dtype (default float32)."""
    scalar = scalar or _float32(op)

    if act == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if act == "gelu":
        inner = op.Erf(op.Mul(x, scalar(0.7071067811865476)))
    elif act == "gelu_tanh":
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Tanh(op.Mul(op.Add(x, op.Mul(cube, scalar(0.044715))), scalar(0.7978845608028654)))
    else:
        raise ValueError(f"activation {act!r}")
    return op.Mul(op.Mul(x, scalar(0.5)), op.Add(inner, scalar(1.0)))


def rotation(op, x, signs, left, right):
    """``ops.rotate``: x [..., K] times ``signs``, as [..., m, p] blocks X, ``left @ X @ right``, back to [..., K];
    the block shape comes from the operands' shapes (left [m, m], right [p, p])."""
    blocks = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(left, start=0, end=1), op.Shape(right, start=0, end=1),
                       axis=0)
    y = op.MatMul(op.MatMul(left, op.Reshape(op.Mul(x, signs), blocks)), right)
    return op.Reshape(y, op.Shape(x))


def scaled_dot_product(op, q, k, v, mask, scale: float, kv_groups: int, scalar=None,
                       masked_score: float = MASKED_SCORE):
    """Softmax(q @ k^T * scale, masked) @ v: q [B, H, S, D], k / v [B, H / g, T, D] -> [B, H, S, D]. Grouped-query
    heads as [B, H / g, g, S, D] against an unsqueezed K / V, so MatMul broadcasts instead of copying K and V g
    times. A boolean mask keeps True (masked scores become ``masked_score``, the dtype's most negative value); a
    float mask is added. ``scalar(v)``: a constant of q's dtype (default float32)."""
    import onnx

    scalar = scalar or _float32(op)

    def ints(*v):
        return op.Constant(value_ints=list(v))

    g = kv_groups
    if g > 1:
        q = op.Reshape(q, op.Concat(op.Shape(k, start=0, end=2), ints(g, -1), op.Shape(q, start=3), axis=0))
        k, v = op.Unsqueeze(k, ints(2)), op.Unsqueeze(v, ints(2))
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 2, 4, 3] if g > 1 else [0, 1, 3, 2])),
                    scalar(scale))
    if mask is not None:
        m = op.Unsqueeze(mask, ints(2)) if g > 1 else mask
        scores = op.Where(m, scores, scalar(masked_score)) if mask.dtype == onnx.TensorProto.BOOL \
            else op.Add(scores, m)
    out = op.MatMul(op.Softmax(scores, axis=-1), v)
    if g > 1:
        out = op.Reshape(out, op.Concat(op.Shape(out, start=0, end=1), ints(-1), op.Shape(out, start=3), axis=0))
    return out


def lowbit_op_functions(op, ms) -> dict:
    """{lowbit op overload: its translation} against ``op`` (the ONNX domain, opset 18) and ``ms``
    (com.microsoft). Over the ~80-line bar on purpose: onnxscript translations are closures over ``op`` and
    ``ms``, one short one per lowbit op; the function is their table."""
    import onnx

    UINT8, FLOAT, INT8 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT, onnx.TensorProto.INT8
    L = torch.ops.lowbit

    def ints(*v):
        return op.Constant(value_ints=list(v))

    def scalar(v: float):
        return op.Constant(value_float=float(v))

    def quantize_rows(x):
        """(float-valued int8 codes, float32 row scales [..., 1])."""
        amax = op.ReduceMax(op.Abs(x), ints(-1), keepdims=1)
        sx = op.Max(op.Div(amax, scalar(ACT_QMAX)), scalar(ACT_EPS))
        return op.Clip(op.Round(op.Div(x, sx)), scalar(-ACT_QMAX), scalar(ACT_QMAX)), sx

    def matmul_codes(q, sx, w, scales, bias, K, N, group, w_zero):
        # ONNX Runtime's fused DynamicQuantizeMatMul uses one scale per tensor, not per token, so the
        # per-token semantics need this standard-op subgraph (all of it runs on ONNX Runtime's CPU EP).
        # uint8 activations with a zero point (the same integers): ONNX Runtime's u8 x s8 and u8 x u8 GEMMs
        # are several times faster than its s8 x s8 one (bench/ort_int8_forms.py).
        qu = op.Cast(op.Add(q, scalar(A_ZERO_U8)), to=UINT8)
        a_zero = op.Constant(value=onnx.helper.make_tensor("a_zero_point", UINT8, [], [A_ZERO_U8]))
        # 8-bit weights come as uint8 with zero point 128: u8 x s8 would saturate on x86 without VNNI.
        zeros = (a_zero, op.Constant(value=onnx.helper.make_tensor("b_zero_point", UINT8, [], [w_zero]))) \
            if w_zero else (a_zero,)
        g = -(-K // group)
        if g == 1:
            y = op.Mul(op.Cast(op.MatMulInteger(qu, w, *zeros), to=FLOAT), scales)
        else:
            flat = op.Reshape(qu, ints(-1, K))
            if g * group != K:
                # pad with the zero point so the padding adds nothing
                flat = op.Pad(flat, ints(0, 0, 0, g * group - K), a_zero)
            grouped = op.Transpose(op.Reshape(flat, ints(-1, g, group)), perm=[1, 0, 2])
            acc = op.MatMulInteger(grouped, w, *zeros)                        # [G, M, N] int32
            y = op.ReduceSum(op.Mul(op.Cast(acc, to=FLOAT), scales), ints(0), keepdims=0)
            y = op.Reshape(y, op.Concat(op.Shape(q, start=0, end=-1), ints(N), axis=0))
        y = op.Mul(y, sx)
        return y if bias is None else op.Add(y, bias)

    def matmul_nbits(x, b, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
        return ms.MatMulNBits(x, b, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size,
                              accuracy_level=accuracy_level)

    def matmul_a8(x, w, scales, bias, K, N, group, w_zero):
        q, sx = quantize_rows(x)
        return matmul_codes(q, sx, w, scales, bias, K, N, group, w_zero)

    def matmul_a8_codes(xq, sx, w, scales, bias, K, N, group, w_zero, dtype):
        return matmul_codes(op.Cast(xq, to=FLOAT), sx, w, scales, bias, K, N, group, w_zero)

    def gather_nbits(ids, data, scales, zero_points, bits, block_size, dim):
        return ms.GatherBlockQuantized(data, ids, scales, zero_points, gather_axis=0, quantize_axis=1,
                                       block_size=block_size, bits=bits)

    def attention(q, k, v, mask, scale, kv_groups):
        return op.Transpose(scaled_dot_product(op, q, k, v, mask, scale, kv_groups), perm=[0, 2, 1, 3])

    def codes(y):
        q, sx = quantize_rows(y)
        return op.Cast(q, to=INT8), sx

    def rmsnorm_quant_int8(x, weight, eps):
        rms = op.Sqrt(op.Add(op.ReduceMean(op.Mul(x, x), ints(-1), keepdims=1), scalar(eps)))
        return codes(op.Mul(weight, op.Div(x, rms)))

    def layernorm_quant_int8(x, weight, bias, eps):
        if weight is None:
            weight = op.Expand(scalar(1.0), op.Shape(x, start=-1))
        y, _, _ = op.LayerNormalization(x, weight, bias, axis=-1, epsilon=eps)      # (Y, Mean, InvStdDev)
        return codes(y)

    def act_mul(y, act):
        gate, up = op.Split(y, axis=-1, num_outputs=2)
        return op.Mul(activation(op, gate, act), up)

    def act_mul_quant_int8(y, act):
        return codes(act_mul(y, act))

    def rotate(x, signs, left, right):
        return rotation(op, x, signs, left, right)

    return {L.ort_matmul_nbits.default: matmul_nbits, L.ort_matmul_a8.default: matmul_a8,
            L.ort_matmul_a8_codes.default: matmul_a8_codes, L.ort_gather_nbits.default: gather_nbits,
            L.attention.default: attention, L.rmsnorm_quant_int8.default: rmsnorm_quant_int8,
            L.layernorm_quant_int8.default: layernorm_quant_int8, L.act_mul.default: act_mul,
            L.act_mul_quant_int8.default: act_mul_quant_int8, L.rotate.default: rotate}
