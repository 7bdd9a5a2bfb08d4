"""``lowbit::ort_*`` ops: ONNX Runtime operators as torch ops (reference + fake kernels + ONNX translation).

Layouts (ONNX Runtime contrib-op specs):

MatMulNBits, for a weight W [N, K] with ``bits`` in {4, 8} ("container" bits) and ``block_size`` a power of
two >= 16: ``B`` uint8 [N, n_blocks, block_size * bits / 8], K padded with zeros up to n_blocks * block_size,
codes low-nibble first for 4 bits; ``scales`` [N * n_blocks] in the activation dtype; ``zero_points`` uint8
[N * ceil(n_blocks * bits / 8)], again low nibble first. 2- and 3-bit codes are stored in 4-bit
containers, 5- to 7-bit codes in 8-bit ones: the math ``(q - z) * s`` is the same, so this is exact.
lowbit groups that are not a power of two split into power-of-two blocks sharing their group's scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.plugins.onnx.integer_matmul import U8S8_EXACT_MAX_ABS_B
from lowbit.plugins.ops import ACT_EPS, ACT_QMAX, quantize_rows_int8, signed_weight
from lowbit.passes.quantize import dequantize_codes, pack_codes, unpack_codes

MIN_BLOCK = 16
CONTRIB_DOMAIN = "com.microsoft"
A_ZERO_U8 = 128         # W8A8 activations go to MatMulInteger as uint8 code + 128
W_ZERO_U8 = 128         # 8-bit weights likewise (uint8 x uint8: exact on every CPU, see integer_matmul)


# ---- layout conversion (compile time) ----------------------------------------------------------------
def container_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def block_size_for(group: int, k: int) -> Optional[int]:
    """The MatMulNBits block for a lowbit group: the group itself when a power of two, else its largest
    power-of-two divisor; per-channel (group == K) is one block covering K. None when no block fits."""
    if group >= k:
        return max(MIN_BLOCK, 1 << (k - 1).bit_length())
    block = group & -group            # largest power of two dividing group
    return block if block >= MIN_BLOCK else None


def to_matmul_nbits(qweight, scales, zeros, bits: int, group: int, k: int, dtype=torch.float32) -> dict:
    """lowbit packed layer -> MatMulNBits tensors and attributes (raises when the group has no block)."""
    block = block_size_for(group, k)
    if block is None:
        raise LowbitError(f"ONNX MatMulNBits needs blocks of a power of two >= {MIN_BLOCK}; group size {group} "
                          "has none (use a group of 16, 32, 64, 128, ... or per-channel)")
    # lowbit's own packing (a little-endian bitstream per row, low nibble first) is MatMulNBits' for 4 and 8 bits.
    cb = container_bits(bits)
    n = qweight.shape[0]
    n_blocks = -(-k // block)
    codes = F.pad(unpack_codes(qweight, bits, k), (0, n_blocks * block - k))     # [N, n_blocks * block]
    b = pack_codes(codes, cb).view(n, n_blocks, block * cb // 8)
    # Which lowbit group each block belongs to (blocks never straddle groups: block divides group).
    owner = torch.clamp(torch.arange(n_blocks) * block // group, max=scales.shape[1] - 1)
    return {"b": b.contiguous(), "scales": scales[:, owner].to(dtype).reshape(-1).contiguous(),
            "zero_points": pack_codes(zeros[:, owner], cb).reshape(-1).contiguous(), "bits": cb, "block_size": block}


def to_matmul_a8(qweight, scales, zeros, bits: int, group: int, k: int) -> dict:
    """lowbit symmetric packed layer -> weight and float32 scales for ``MatMulInteger``: [K, N] and [N]
    per-channel, else [G, group, N] (K padded with zero weights) and [G, 1, N], one int32 product per group.

    The weight's type picks the form that is exact on every CPU (``integer_matmul``): codes of at most 7 bits
    (|w| <= 64) stay int8 for ONNX Runtime's uint8 x int8 GEMM, 8-bit ones become uint8 ``w + 128`` with zero
    point ``w_zero = 128`` for its uint8 x uint8 GEMM."""
    w = signed_weight(qweight, zeros, bits, k, group)                          # [N, K] int8
    w_zero = 0 if 1 << (bits - 1) <= U8S8_EXACT_MAX_ABS_B else W_ZERO_U8
    if w_zero:
        w = (w.to(torch.int16) + w_zero).to(torch.uint8)
    n, g = w.shape[0], scales.shape[1]
    if g == 1:
        return {"w": w.t().contiguous(), "scales": scales.float().reshape(n).contiguous(), "w_zero": w_zero}
    w = F.pad(w, (0, g * group - k), value=w_zero).view(n, g, group).permute(1, 2, 0)    # [G, group, N]
    return {"w": w.contiguous(), "scales": scales.float().t().reshape(g, 1, n).contiguous(), "w_zero": w_zero}


def gather_block_ok(group: int, dim: int) -> bool:
    """GatherBlockQuantized blocks: a power of two >= 16 that divides the row (no ragged or split groups)."""
    return group >= MIN_BLOCK and group & (group - 1) == 0 and dim % group == 0


def to_gather_nbits(qweight, scales, zeros, bits: int, group: int, dim: int, dtype=torch.float32) -> dict:
    """lowbit packed embedding table -> GatherBlockQuantized tensors (uint8 data, 4- or 8-bit)."""
    if not gather_block_ok(group, dim):
        raise LowbitError(f"ONNX GatherBlockQuantized needs the embedding group ({group}) to be a power of two "
                          f">= {MIN_BLOCK} that divides the embedding size {dim}; change the recipe's group_size "
                          "or set quantize_embeddings = false")
    cb = container_bits(bits)
    return {"data": pack_codes(unpack_codes(qweight, bits, dim), cb).contiguous(),
            "scales": scales.to(dtype).contiguous(), "zero_points": pack_codes(zeros, cb).contiguous(),
            "bits": cb, "block_size": group}


# ---- torch ops with ONNX Runtime semantics ----------------------------------------------------------
@torch.library.custom_op("lowbit::ort_matmul_nbits", mutates_args=())
def ort_matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                     bias: Optional[torch.Tensor], K: int, N: int, bits: int, block_size: int,
                     accuracy_level: int) -> torch.Tensor:
    n_blocks = b.shape[1]
    codes = unpack_codes(b.reshape(N, -1), bits, K)
    z = unpack_codes(zero_points.view(N, -1), bits, n_blocks)
    w = dequantize_codes(codes, scales.view(N, n_blocks), z, block_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@ort_matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("lowbit::ort_matmul_a8", mutates_args=())
def ort_matmul_a8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                  K: int, N: int, group: int, w_zero: int) -> torch.Tensor:
    q, sx = quantize_rows_int8(x)
    q = q.double()
    w = w.double() - w_zero
    g = -(-K // group)
    if g == 1:
        y = (q @ w).float() * scales                                             # exact int32 sums
    else:
        q = F.pad(q, (0, g * group - K)).reshape(-1, g, group).transpose(0, 1)   # [G, M, group]
        acc = torch.bmm(q, w)                                                     # [G, M, N]
        y = (acc.float() * scales).sum(0).reshape(*x.shape[:-1], N)
    y = y * sx
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@ort_matmul_a8.register_fake
def _(x, w, scales, bias, K, N, group, w_zero):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("lowbit::ort_gather_nbits", mutates_args=())
def ort_gather_nbits(ids: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                     bits: int, block_size: int, dim: int) -> torch.Tensor:
    flat = ids.reshape(-1)
    codes = unpack_codes(data[flat], bits, dim)
    z = unpack_codes(zero_points[flat], bits, scales.shape[1])
    rows = dequantize_codes(codes, scales[flat], z, block_size)
    return rows.to(scales.dtype).reshape(*ids.shape, dim)


@ort_gather_nbits.register_fake
def _(ids, data, scales, zero_points, bits, block_size, dim):
    return scales.new_empty((*ids.shape, dim))


# ---- export modules ----------------------------------------------------------------------------------
class OrtMatMulNBits(torch.nn.Module):
    def __init__(self, layer, accuracy_level: int, dtype):
        super().__init__()
        t = to_matmul_nbits(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size,
                            layer.in_features, dtype)
        for name in ("b", "scales", "zero_points"):
            self.register_buffer(name, t[name])
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dtype))
        self.k, self.n, self.bits, self.block_size = layer.in_features, layer.out_features, t["bits"], t["block_size"]
        self.accuracy_level = accuracy_level

    def forward(self, x):
        return torch.ops.lowbit.ort_matmul_nbits(x, self.b, self.scales, self.zero_points, self.bias, self.k,
                                                 self.n, self.bits, self.block_size, self.accuracy_level)


class OrtMatMulA8(torch.nn.Module):
    def __init__(self, layer, dtype):
        super().__init__()
        t = to_matmul_a8(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)
        self.register_buffer("w", t["w"])
        self.register_buffer("scales", t["scales"])
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dtype))
        self.k, self.n, self.group, self.w_zero = layer.in_features, layer.out_features, layer.group_size, t["w_zero"]

    def forward(self, x):
        return torch.ops.lowbit.ort_matmul_a8(x, self.w, self.scales, self.bias, self.k, self.n, self.group,
                                              self.w_zero)


class OrtGatherNBits(torch.nn.Module):
    def __init__(self, emb, dtype):
        super().__init__()
        t = to_gather_nbits(emb.qweight, emb.scales, emb.zeros, emb.bits, emb.group_size, emb.embedding_dim, dtype)
        for name in ("data", "scales", "zero_points"):
            self.register_buffer(name, t[name])
        self.bits, self.block_size, self.dim = t["bits"], t["block_size"], emb.embedding_dim

    def forward(self, ids):
        return torch.ops.lowbit.ort_gather_nbits(ids, self.data, self.scales, self.zero_points, self.bits,
                                                 self.block_size, self.dim)


def for_onnx(model: torch.nn.Module, accuracy_level: int = 0, dtype=torch.float32) -> dict:
    """Swap the runtime's quantized modules for their ONNX Runtime forms in place; returns counts by op."""
    from lowbit.compiler.hf_modules import QuantEmbedding, QuantLinear, swap_module

    counts: dict = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            new = OrtMatMulA8(mod, dtype) if mod.op == "w8a8_linear" else OrtMatMulNBits(mod, accuracy_level, dtype)
        elif isinstance(mod, QuantEmbedding):
            new = OrtGatherNBits(mod, dtype)
        else:
            continue
        swap_module(model, name, new)
        counts[type(new).__name__] = counts.get(type(new).__name__, 0) + 1
    return counts


# ---- ONNX translations (onnxscript, used by torch.onnx.export's custom_translation_table) -------------
def translations() -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export`` (imports onnxscript on first use)."""
    import onnx
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    register_contrib_schemas()
    ms = Opset(CONTRIB_DOMAIN, 1)
    matmul_nbits_op, gather_block_quantized_op = ms.MatMulNBits, ms.GatherBlockQuantized
    UINT8, FLOAT = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT

    def matmul_nbits(x, b, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
        return matmul_nbits_op(x, b, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size,
                              accuracy_level=accuracy_level)

    def matmul_a8(x, w, scales, bias, K, N, group, w_zero):
        # ONNX Runtime's fused DynamicQuantizeMatMul uses one scale per tensor, not per token, so the
        # per-token semantics need this standard-op subgraph (all of it runs on ONNX Runtime's CPU EP).
        amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        sx = op.Max(op.Div(amax, op.Constant(value_float=float(ACT_QMAX))), op.Constant(value_float=ACT_EPS))
        q = op.Clip(op.Round(op.Div(x, sx)), op.Constant(value_float=-float(ACT_QMAX)),
                    op.Constant(value_float=float(ACT_QMAX)))
        # uint8 activations with a zero point (the same integers): ONNX Runtime's u8 x s8 and u8 x u8 GEMMs
        # are several times faster than its s8 x s8 one (bench/ort_int8_forms.py).
        q = op.Cast(op.Add(q, op.Constant(value_float=float(A_ZERO_U8))), to=UINT8)
        a_zero = op.Constant(value=onnx.helper.make_tensor("a_zero_point", UINT8, [], [A_ZERO_U8]))
        # 8-bit weights come as uint8 with zero point 128: u8 x s8 would saturate on x86 without VNNI.
        zeros = (a_zero, op.Constant(value=onnx.helper.make_tensor("b_zero_point", UINT8, [], [w_zero]))) \
            if w_zero else (a_zero,)
        g = -(-K // group)
        if g == 1:
            acc = op.MatMulInteger(q, w, *zeros)
            y = op.Mul(op.Cast(acc, to=FLOAT), scales)
        else:
            flat = op.Reshape(q, op.Constant(value_ints=[-1, K]))
            if g * group != K:
                # pad with the zero point so the padding adds nothing
                flat = op.Pad(flat, op.Constant(value_ints=[0, 0, 0, g * group - K]), a_zero)
            grouped = op.Transpose(op.Reshape(flat, op.Constant(value_ints=[-1, g, group])), perm=[1, 0, 2])
            acc = op.MatMulInteger(grouped, w, *zeros)                        # [G, M, N] int32
            y = op.ReduceSum(op.Mul(op.Cast(acc, to=FLOAT), scales), op.Constant(value_ints=[0]), keepdims=0)
            y = op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=[N]), axis=0))
        y = op.Mul(y, sx)
        return y if bias is None else op.Add(y, bias)

    def gather_nbits(ids, data, scales, zero_points, bits, block_size, dim):
        return gather_block_quantized_op(data, ids, scales, zero_points, gather_axis=0, quantize_axis=1,
                                       block_size=block_size, bits=bits)

    return {torch.ops.lowbit.ort_matmul_nbits.default: matmul_nbits,
            torch.ops.lowbit.ort_matmul_a8.default: matmul_a8,
            torch.ops.lowbit.ort_gather_nbits.default: gather_nbits}


def register_contrib_schemas():
    """Register the schemas of the ONNX Runtime contrib ops lowbit emits with onnx (which ships none), so
    onnxscript can build the nodes and onnx.checker can check them. Signatures follow ONNX Runtime's
    ContribOperators documentation."""
    from onnx import defs

    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    opt = defs.OpSchema.FormalParameterOption.Optional
    INT = defs.OpSchema.AttrType.INT
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        defs.OpSchema(
            "MatMulNBits", CONTRIB_DOMAIN, 1, "Y = A @ dequant(B).T + bias; B blockwise quantized along K.",
            inputs=[P("A", "T1", "activations"), P("B", "T2", "packed weight"), P("scales", "T1", "block scales"),
                    P("zero_points", "T3", "block zero points", param_option=opt),
                    P("g_idx", "T4", "group of each column", param_option=opt),
                    P("bias", "T1", "bias", param_option=opt)],
            outputs=[P("Y", "T1", "output")],
            type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                              ("T3", ["tensor(uint8)", "tensor(int32)", *floats], ""), ("T4", ["tensor(int32)"], "")],
            attributes=[A("K", INT, "", required=True), A("N", INT, "", required=True),
                        A("bits", INT, "", required=False), A("block_size", INT, "", required=True),
                        A("accuracy_level", INT, "", required=False)]),
        defs.OpSchema(
            "GatherBlockQuantized", CONTRIB_DOMAIN, 1, "Gather rows of a blockwise quantized table, dequantized.",
            inputs=[P("data", "T1", "packed table"), P("indices", "Tind", "indices"), P("scales", "T2", "scales"),
                    P("zero_points", "T1", "zero points", param_option=opt)],
            outputs=[P("output", "T2", "rows")],
            type_constraints=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], ""), ("T2", floats, ""),
                              ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
            attributes=[A("gather_axis", INT, "", required=False), A("quantize_axis", INT, "", required=False),
                        A("block_size", INT, "", required=False), A("bits", INT, "", required=False)]),
    ]
    for schema in schemas:
        try:
            defs.get_schema(schema.name, schema.since_version, schema.domain)
        except defs.SchemaError:
            defs.register_schema(schema)
