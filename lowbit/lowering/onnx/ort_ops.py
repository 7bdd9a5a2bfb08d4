"""``lowbit::ort_*`` ops: ONNX Runtime operators as torch ops (reference + fake kernels; their ONNX nodes are in
``translations``), and the repacking of lowbit's layouts into theirs.

Layouts (ONNX Runtime contrib-op specs):

MatMulNBits, for a weight W [N, K] with ``bits`` in {4, 8} ("container" bits) and ``block_size`` a power of
two >= 16: ``B`` uint8 [N, n_blocks, block_size * bits / 8], K padded with zeros up to n_blocks * block_size,
codes low-nibble first for 4 bits; ``scales`` [N * n_blocks] in the activation dtype; ``zero_points`` uint8
[N * ceil(n_blocks * bits / 8)], again low nibble first, or absent when every zero point is the operators' default
2^(bits-1) (symmetric weights: ONNX Runtime then runs its faster symmetric kernels). 2- and 3-bit codes are stored in 4-bit
containers, 5- to 7-bit codes in 8-bit ones: the math ``(q - z) * s`` is the same, so this is exact.
lowbit groups that are not a power of two split into power-of-two blocks sharing their group's scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.lowering.onnx.integer_matmul import U8S8_EXACT_MAX_ABS_B
from lowbit.ops import quantize_rows_int8, signed_weight
from lowbit.format.quantize import block_groups, dequantize_codes, pack_codes, unpack_codes

MIN_BLOCK = 16
CONTRIB_DOMAIN = "com.microsoft"
A_ZERO_U8 = 128         # W8A8 activations go to MatMulInteger as uint8 code + 128
W_ZERO_U8 = 128         # 8-bit weights likewise (uint8 x uint8: exact on every CPU, see integer_matmul)


# ---- layout conversion (compile time) ----------------------------------------------------------------
def container_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def packed_zero_points(zeros: torch.Tensor, cb: int) -> Optional[torch.Tensor]:
    """Zero points packed in ``cb``-bit containers, or None when all are the contrib ops' default 2^(cb-1)."""
    if bool((zeros == 1 << (cb - 1)).all()):
        return None
    return pack_codes(zeros, cb).contiguous()


def _zeros_or_default(zero_points: Optional[torch.Tensor], bits: int, rows: int, n: int) -> torch.Tensor:
    if zero_points is None:
        return torch.full((rows, n), 1 << (bits - 1), dtype=torch.uint8)
    return unpack_codes(zero_points.reshape(rows, -1), bits, n)


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
    owner = block_groups(k, block, group, scales.shape[1])
    return {"b": b.contiguous(), "scales": scales[:, owner].to(dtype).reshape(-1).contiguous(),
            "zero_points": None if (zp := packed_zero_points(zeros[:, owner], cb)) is None else zp.reshape(-1),
            "bits": cb, "block_size": block}


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
            "scales": scales.to(dtype).contiguous(), "zero_points": packed_zero_points(zeros, cb),
            "bits": cb, "block_size": group}


# ---- torch ops with ONNX Runtime semantics ----------------------------------------------------------
@torch.library.custom_op("lowbit::ort_matmul_nbits", mutates_args=())
def ort_matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], K: int, N: int, bits: int, block_size: int,
                     accuracy_level: int) -> torch.Tensor:
    n_blocks = b.shape[1]
    codes = unpack_codes(b.reshape(N, -1), bits, K)
    z = _zeros_or_default(zero_points, bits, N, n_blocks)
    w = dequantize_codes(codes, scales.view(N, n_blocks), z, block_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@ort_matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


def matmul_a8_codes_reference(xq, sx, w, scales, bias, K: int, N: int, group: int, w_zero: int, dtype):
    """``MatMulInteger`` over per-token INT8 codes ``xq`` (row scales ``sx``): exact int32 sums per group, then
    the weight and row rescale (the ONNX subgraph's math)."""
    lead = xq.shape[:-1]
    q = xq.reshape(-1, K).double()
    w = w.double() - w_zero
    g = -(-K // group)
    if g == 1:
        y = (q @ w).float() * scales                                             # exact int32 sums
    else:
        q = F.pad(q, (0, g * group - K)).reshape(-1, g, group).transpose(0, 1)   # [G, M, group]
        acc = torch.bmm(q, w)                                                     # [G, M, N]
        y = (acc.float() * scales).sum(0)
    y = y.reshape(*lead, N) * sx
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


@torch.library.custom_op("lowbit::ort_matmul_a8", mutates_args=())
def ort_matmul_a8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                  K: int, N: int, group: int, w_zero: int) -> torch.Tensor:
    q, sx = quantize_rows_int8(x)
    return matmul_a8_codes_reference(q, sx, w, scales, bias, K, N, group, w_zero, x.dtype)


@ort_matmul_a8.register_fake
def _(x, w, scales, bias, K, N, group, w_zero):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("lowbit::ort_matmul_a8_codes", mutates_args=())
def ort_matmul_a8_codes(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                        bias: Optional[torch.Tensor], K: int, N: int, group: int, w_zero: int,
                        dtype: torch.dtype) -> torch.Tensor:
    return matmul_a8_codes_reference(xq, sx, w, scales, bias, K, N, group, w_zero, dtype)


@ort_matmul_a8_codes.register_fake
def _(xq, sx, w, scales, bias, K, N, group, w_zero, dtype):
    return xq.new_empty((*xq.shape[:-1], N), dtype=dtype)


@torch.library.custom_op("lowbit::ort_gather_nbits", mutates_args=())
def ort_gather_nbits(ids: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                     bits: int, block_size: int, dim: int) -> torch.Tensor:
    flat = ids.reshape(-1)
    codes = unpack_codes(data[flat], bits, dim)
    z = _zeros_or_default(None if zero_points is None else zero_points[flat], bits, flat.numel(), scales.shape[1])
    rows = dequantize_codes(codes, scales[flat], z, block_size)
    return rows.to(scales.dtype).reshape(*ids.shape, dim)


@ort_gather_nbits.register_fake
def _(ids, data, scales, zero_points, bits, block_size, dim):
    return scales.new_empty((*ids.shape, dim))


# The ONNX Runtime contrib operators lowbit emits.
CONTRIB_OPS = ("MatMulNBits", "GatherBlockQuantized")


def register_contrib_schemas():
    """Register with onnx (which ships none) ONNX Runtime's own schemas of the contrib ops lowbit emits, so
    onnxscript can build the nodes and onnx.checker checks them against what ONNX Runtime will accept."""
    from onnx import defs

    for name in CONTRIB_OPS:
        try:
            defs.get_schema(name, 1, CONTRIB_DOMAIN)
        except defs.SchemaError:
            defs.register_schema(ort_schema(name))


def ort_schema(name: str):
    """ONNX Runtime's schema of contrib op ``name`` (``get_all_operator_schema``), as an ``onnx.defs.OpSchema``."""
    from onnx import AttributeProto, defs
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    src = next((s for s in ort_c.get_all_operator_schema() if s.domain == CONTRIB_DOMAIN and s.name == name), None)
    if src is None:
        raise LowbitError(f"this onnxruntime has no {CONTRIB_DOMAIN}::{name}; install the onnxruntime constraints.txt "
                          "pins")
    param, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute

    def formal(p):
        option = defs.OpSchema.FormalParameterOption(int(p.option))
        return param(p.name, p.typeStr, p.description or "", param_option=option, is_homogeneous=p.isHomogeneous)

    attributes = []
    for a in src.attributes.values():
        default = AttributeProto.FromString(a._default_value) if a._default_value else None
        attributes.append(attr(a.name, default, a.description or "") if default is not None and default.name
                          else attr(a.name, defs.OpSchema.AttrType(int(a.type)), a.description or "",
                                    required=a.required))
    return defs.OpSchema(name, CONTRIB_DOMAIN, src.since_version, src.doc or "",
                         inputs=[formal(p) for p in src.inputs], outputs=[formal(p) for p in src.outputs],
                         type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description or "")
                                           for t in src.type_constraints], attributes=attributes)
