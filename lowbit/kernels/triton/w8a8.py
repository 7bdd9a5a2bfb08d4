"""INT8 x INT8 -> INT32 GEMM with the W8A8 dequantization fused in the epilogue.

``y[m, n] = sx[m] * sum_g acc_g[m, n] * sw[n, g] + bias[n]``: exactly what ``ops.w8a8_linear`` computes,
with ``acc_g`` the exact int32 sum of int8 products over weight group g. The weight is read from the stored
layout (``lowbit.format.quantize``): 8-bit codes minus their zero point (128 when symmetric), or 4-bit
nibbles minus theirs (8; W4A8), widened to int8 in registers and fed to ``tl.dot(..., out_dtype=int32)``.

8-bit per-channel weights (the W8A8 recipes) take a shorter road: the bytes go to the dot as code - 128, which
is each byte with its top bit flipped (one xor per four weights), and the zero point is restored once per
output in the epilogue, ``sum_k x (q - z) = sum_k x (q - 128) + (128 - z) * sum_k x``, from the row sums of
the int8 activations that the quantization kernel adds up as it writes them. No code is unpacked and nothing
is widened per weight, so the main loop is loads, one xor per register and the MMAs. The result is the exact
integer sum whenever code - zero fits int8, which symmetric weights always satisfy.

``SIGNED`` reads int8 weights [N, K] as they are, with no zero points (the TensorRT plugin ``int8_linear``
stores them so: ``lowbit.kernels.tensorrt``).

Tiling: [BM, BN] output tiles over all of K, grouped along M for L2 reuse of the weight tile. The K loop
is flat (so the loads pipeline across groups) and accumulates int32; at the last tile of each group the int32
sum is converted, scaled by the group's fp16 scale and added to an fp32 accumulator, then restarted. A K
tile never straddles two groups (BK divides g, and int8 tensor-core dots need BK >= 32, so grouped weights
need g a multiple of 32). Per-channel weights keep one int32 sum over K and scale once in the epilogue.

The float epilogue follows the reference's order (sum over groups, times sx, plus bias, plus the residual when
given), so the result
matches it to float rounding; the int32 sums match exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import interpreting, next_pow2
from lowbit.kernels.triton.act_quant import quantize_rows
from lowbit.kernels.triton.packed import SUPPORTED_BITS, bk_pruner, fit_bk, load_codes, output_tile, packed_view, \
    store_dtype, with_even_k

MIN_BK = 32                 # int8 tl.dot needs K tiles of at least 32


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether this kernel can run a symmetric weight of this format (else the op uses the reference)."""
    if bits not in SUPPORTED_BITS or in_features <= 0 or group_size <= 0:
        return False
    return group_size >= in_features or group_size % MIN_BK == 0


_FLIP_BYTES = tl.constexpr("xor.b32 $0, $1, 0x80808080;")       # four bytes' top bits: code - 128 as int8


# One Triton kernel body over the ~80-line bar on purpose: the GEMM's loads, integer products and epilogue must
# live in one jitted function (a helper call per tile would cost registers and fusion).
@triton.jit
def _w8a8_kernel(x_ptr, sx_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr,
                 M, N, K, KP, GROUP, M_BUCKET,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_rm, stride_ym,
                 BITS: tl.constexpr, PER: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr,
                 CENTERED: tl.constexpr, FLIP_ASM: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 SIGNED: tl.constexpr = False):
    # SWAP (Hopper): the product is computed transposed, y.T tile [BN, BM] = W [BN, BK] @ x.T [BK, BM], so the
    # weight, transformed in registers (flipped or widened), is wgmma's register operand instead of being
    # written back to shared memory for it (wgmma reads only its first operand from registers). On sm80/sm86
    # (mma.sync, every operand from registers) the plain orientation compiles to about a third of the
    # instructions. The accumulators stay in the dot's orientation; the epilogue transposes once.
    rm, rn, m_mask, n_mask = output_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        acc_i = tl.zeros((BN, BM), dtype=tl.int32)      # the current group's exact integer sum
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    if ONE_GROUP and not SIGNED:
        z = tl.load(z_ptr + rn * stride_zn, mask=n_mask, other=0).to(tl.int32)
    n_tiles = tl.cdiv(K, BK)
    for t in range(0, n_tiles):
        k0 = t * BK
        rk0 = k0 + rk
        if EVEN_K:
            a = tl.load(x_rows + rk0[None, :], mask=m_mask[:, None], other=0)
        else:
            a = tl.load(x_rows + rk0[None, :], mask=m_mask[:, None] & (rk0[None, :] < K), other=0)
        if not ONE_GROUP and not SIGNED:
            z = tl.load(z_ptr + rn * stride_zn + k0 // GROUP, mask=n_mask, other=0).to(tl.int32)
        if CENTERED or SIGNED:
            # 8-bit per-channel: the dot takes code - 128, the byte with its top bit flipped, and code - zero is
            # restored once in the epilogue. Compiled, the flip is one xor per register of four bytes (inline
            # PTX: Triton's own i8 xor unpacks, flips and repacks each byte in the mma operand layout of sm80);
            # the interpreter, which cannot run PTX, flips bytes one by one.
            # Rows past N read row N - 1 rather than a masked load: a mask per byte costs a select per byte.
            w_ptrs = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn + rk0[None, :]
            if EVEN_K:
                raw = tl.load(w_ptrs)
            else:
                raw = tl.load(w_ptrs, mask=rk0[None, :] < K)      # past K: x is 0, any byte will do
            if SIGNED:
                w = raw                 # int8 weights as they are (the TensorRT plugin's layout)
            elif FLIP_ASM:
                w = tl.inline_asm_elementwise(_FLIP_BYTES, "=r,r", [raw], dtype=tl.int8, is_pure=True, pack=4)
            else:
                w = (raw ^ 0x80).to(tl.int8, bitcast=True)
        else:
            q = load_codes(w_ptr, rn, n_mask, k0, KP, stride_wn, BITS, PER, BK, BN, EVEN_K)
            # code - zero is the signed weight; the int8 cast wraps exactly like ops.signed_weight's .to(int8).
            w = (q - z[:, None]).to(tl.int8)
        # Both tiles are K-major ([rows, BK] as stored), the layout int8 tensor-core MMAs take.
        if SWAP:
            acc_i = tl.dot(w, tl.trans(a), acc_i, out_dtype=tl.int32)
        else:
            acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
        if not ONE_GROUP:
            if ((k0 + BK) % GROUP == 0) | (t == n_tiles - 1):
                s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
                if SWAP:
                    acc += acc_i.to(tl.float32) * s[:, None]
                    acc_i = tl.zeros((BN, BM), dtype=tl.int32)
                else:
                    acc += acc_i.to(tl.float32) * s[None, :]
                    acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    if ONE_GROUP:
        # The int32 sum's epilogue, [BM, BN] from here on.
        if SWAP:
            acc_i = tl.trans(acc_i)
        if CENTERED and not SIGNED:
            # sum_k x (q - z) = sum_k x (q - 128) + (128 - z) * sum_k x, with the row sums of the codes.
            xs = tl.load(xs_ptr + rm, mask=m_mask, other=0)
            acc_i += xs[:, None] * (128 - z)[None, :]
        s = tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc_i.to(tl.float32) * s[None, :]
    elif SWAP:
        acc = tl.trans(acc)

    sx = tl.load(sx_ptr + rm, mask=m_mask, other=0.0)
    y = acc * sx[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


_CONFIGS = [
    _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 128, 4, 4), _cfg(128, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 3), _cfg(16, 64, 256, 4, 3),
    _cfg(32, 128, 128, 4, 4),
]
_w8a8 = with_even_k(_w8a8_kernel)
_tuned = triton.autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "BITS", "PER"],
                         prune_configs_by={"early_config_prune": bk_pruner(MIN_BK)})(_w8a8)
_INTERPRET_CONFIG = {"BM": 32, "BN": 32, "BK": 64}


def _swap(device: torch.device) -> bool:
    """The transposed product on Hopper and later (see _w8a8_kernel), the plain one before and in the
    interpreter (a forced config's SWAP overrides)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def w8a8_matmul(xq: torch.Tensor, sx: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                out_dtype: torch.dtype, config: dict | None = None, x_sums: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """int8 xq [M, K] (row scales sx [M, 1] float32) times the stored weight (+ bias, + residual [M, N]) -> [M, N]
    in ``out_dtype``.

    ``x_sums`` (int32 [M], the row sums of xq; ``quantize_rows(..., with_sums=True)`` gives them for free) is
    used by 8-bit per-channel weights, and computed here when not given.

    ``config`` forces one kernel config (BM, BN, BK, optionally GROUP_M, SWAP, num_warps, num_stages) instead of
    autotuning; BK is lowered where needed so a K tile stays within one group.
    """
    m, k = xq.shape
    n = qweight.shape[0]
    if k != in_features or not supports(bits, group_size, in_features) or xq.dtype != torch.int8:
        raise ValueError(f"w8a8_matmul: unsupported bits={bits} group={group_size} K={in_features} "
                         f"(x K={k}, {xq.dtype})")
    if m == 0:
        return torch.empty((0, n), device=xq.device, dtype=out_dtype)
    if xq.stride(1) != 1:
        xq = xq.contiguous()
    sx = sx.reshape(m).float().contiguous()
    centered = bits == 8 and group_size >= k
    if centered:
        wq, per = qweight.contiguous(), 1            # bytes, one code each
        x_sums = xq.sum(1, dtype=torch.int32) if x_sums is None else x_sums.reshape(m).to(torch.int32)
    else:
        wq, per = packed_view(qweight, bits)
    scales, zeros = scales.contiguous(), zeros.contiguous()        # the kernel assumes unit stride along G
    bias = None if bias is None else bias.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty((m, n), device=xq.device, dtype=store_dtype(out_dtype))
    res = residual if residual is not None else out          # not read without HAS_RES
    args = (xq, sx, x_sums if centered else sx, wq, scales, zeros, bias if bias is not None else scales, res, out,
            m, n, k, wq.shape[1], group_size, next_pow2(m),
            xq.stride(0), wq.stride(0), scales.stride(0), zeros.stride(0), res.stride(0), out.stride(0))
    consts = dict(BITS=bits, PER=per, ONE_GROUP=group_size >= k, HAS_BIAS=bias is not None,
                  HAS_RES=residual is not None, CENTERED=centered,
                  FLIP_ASM=not interpreting(), SWAP=_swap(xq.device))
    if config is None and interpreting():
        config = dict(_INTERPRET_CONFIG)
    if config is not None:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        cfg.setdefault("GROUP_M", 8)
        consts["SWAP"] = cfg.pop("SWAP", consts["SWAP"])
        cfg["BK"] = fit_bk(cfg["BK"], group_size, k, MIN_BK)
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
        _w8a8[grid](*args, **consts, **cfg, num_warps=warps, num_stages=stages)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
        _tuned[grid](*args, **consts)
    return out.to(out_dtype)


def w8a8_linear(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                config: dict | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.w8a8_linear`` on a 2-D x: per-token INT8 quantization, then the fused integer GEMM."""
    xq, sx, x_sums = quantize_rows(x2d, with_sums=True)
    return w8a8_matmul(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features, x2d.dtype, config,
                       x_sums, residual)
