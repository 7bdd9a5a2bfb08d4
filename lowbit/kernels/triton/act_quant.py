"""Per-token (row) symmetric INT8 activation quantization, alone or fused behind RMSNorm / LayerNorm or a gated
activation ``act(gate) * up``; and that gated activation alone.

Bit-identical to ``lowbit.ops.quantize_rows_int8`` (every backend must produce the same codes):
in float32, ``scale = max(max|x| / 127, 1e-10)``, ``code = clip(round_half_even(x / scale), -127, 127)``.
Two details make that hold on a GPU:

- Division is ``div_rn`` (IEEE round-to-nearest); ``/`` lowers to a faster division that is not correctly
  rounded on NVIDIA GPUs.
- Round half to even by the magic-number trick: adding then subtracting 1.5 * 2^23 leaves the float32 sum
  with no fraction bits, so the hardware's round-to-nearest-even does the rounding. It is exact for
  |v| < 2^22, and |x / scale| <= 127 (up to rounding) here. (libdevice ``rint`` is not available in the
  interpreter, which the tests run on.)

One program per row. A row of at most BLOCK (16384) elements is read once and held in registers; a longer one is
walked in chunks, one pass per statistic (the row's re-reads come from L1/L2). The fused norms follow transformers
/ PyTorch exactly where it is cheap to: RMSNorm as LlamaRMSNorm (``x * 1/sqrt(mean(x^2) + eps)`` in float32,
rounded to x's dtype, times the weight in the promoted dtype), LayerNorm as ``((x - mean) * rstd) * w + b`` in
float32 rounded to x's dtype, then quantized like the unfused ``norm -> w8a8_linear`` sequence would. What differs
from PyTorch is the order (and, on a GPU, FMA contraction) of the sums behind mean and variance: the normalizer
can differ in its last bit, which moves a code by one where the scaled value lies within rounding of a .5 boundary
(or, for fp16/bf16 x, where the last-bit change flips the rounding of a normalized value to x's dtype). Inputs
whose sums are exact give identical codes. The gated activation reads a row's two halves (gate, up), rounds
``act(gate)`` and the product to the row's dtype as PyTorch's two ops do; its SiLU / erf / tanh come from Triton's
exp and erf, which may differ from PyTorch's in the last bit (a code moves by one only at a .5 boundary).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import next_pow2
from lowbit.kernels.triton.packed import TL_DTYPES

MAX_BLOCK = 16384           # elements of a row held at once (in registers); longer rows loop


@triton.jit
def _quantize(v, scale):
    """int8 codes of float32 v against a float32 scale: round half to even, clip to [-127, 127]."""
    r = tl.math.div_rn(v, scale)
    r = (r + 12582912.0) - 12582912.0        # 1.5 * 2^23: rounds to an integer, ties to even
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)


@triton.jit
def _row_scale(amax):
    """max|x| / 127, floored at 1e-10: ops.ACT_QMAX and ops.ACT_EPS (literals here: a kernel reads constants)."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), 1e-10)


# What comes in front of the quantization (the kernel's PRE): nothing, a norm, or a gated activation over the
# row's two halves; constexpr so the kernels can read them.
NONE, RMS, LAYER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
SILU_MUL, GELU_MUL, GELU_TANH_MUL = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
GATED = {"silu": SILU_MUL, "gelu": GELU_MUL, "gelu_tanh": GELU_TANH_MUL}      # ops.ACTIVATIONS' names


@triton.jit
def _inv_root_mean(total, KF, eps):
    """1 / sqrt(total / K + eps), each step correctly rounded: torch's mean is sum / K, and torch.rsqrt on CPU
    is 1 / sqrt, each correctly rounded (the PTX rsqrt is an approximation)."""
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(total, KF) + eps))


@triton.jit
def _norm_values(v, w_ptr, b_ptr, k0, cols, K, shift, mul, PRE: tl.constexpr, X_DTYPE: tl.constexpr,
                 Y_DTYPE: tl.constexpr):
    """The value to quantize, as float32, from x's values ``v`` (float32) at columns k0+cols: x itself;
    LlamaRMSNorm's output (``mul`` = 1/rms); or nn.LayerNorm's (``shift`` = mean, ``mul`` = 1/std)."""
    mask = k0 + cols < K
    if PRE == RMS:
        w = tl.load(w_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        h = (v * mul).to(X_DTYPE).to(tl.float32)
        v = (w * h).to(Y_DTYPE).to(tl.float32)
    elif PRE == LAYER:
        w = tl.load(w_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        v = (((v - shift) * mul) * w + b).to(X_DTYPE).to(tl.float32)
    return v


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """SiLU, erf GELU or tanh GELU of float32 g (tanh(z) = 1 - 2 / (exp(2z) + 1), z clipped to +-20 where tanh is
    +-1 in float32 and exp cannot overflow)."""
    if ACT == SILU_MUL:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == GELU_MUL:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        z = tl.minimum(tl.maximum(z, -20.0), 20.0)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    return a


@triton.jit
def _gated(x_row, k0, cols, K, ACT: tl.constexpr, X_DTYPE: tl.constexpr):
    """``act(gate) * up`` as float32 at columns k0+cols of a row whose gate is [0, K) and up [K, 2K) (zero past K),
    each step rounded to x's dtype as PyTorch's separate ops round it."""
    mask = k0 + cols < K
    g = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + K + k0 + cols, mask=mask, other=0.0).to(tl.float32)
    a = _activation(g, ACT).to(X_DTYPE).to(tl.float32)
    return (a * u).to(X_DTYPE).to(tl.float32)


@triton.jit
def _normed(x_row, w_ptr, b_ptr, k0, cols, K, shift, mul, PRE: tl.constexpr, X_DTYPE: tl.constexpr,
            Y_DTYPE: tl.constexpr):
    """The values to quantize at columns k0+cols (zero past K), loaded here: ``_norm_values`` of x's chunk, or the
    gated activation of the row's halves."""
    if PRE >= SILU_MUL:
        v = _gated(x_row, k0, cols, K, PRE, X_DTYPE)
    else:
        v = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        v = _norm_values(v, w_ptr, b_ptr, k0, cols, K, shift, mul, PRE, X_DTYPE, Y_DTYPE)
    return v


@triton.jit
def _row_quant_kernel(x_ptr, w_ptr, b_ptr, q_ptr, s_ptr, sum_ptr, K, KF, eps, stride_xm, stride_qm,
                      PRE: tl.constexpr, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, WITH_SUM: tl.constexpr,
                      SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """One row: the norm's statistics (if any), then the max of |value| for the scale, then the codes.

    SINGLE (K <= BLOCK): the row is read from memory once and every pass works on the registers; the sums run
    in the same order as the chunked passes over one chunk, so the results are the same bits. Otherwise each
    pass re-reads the row in chunks (from L1/L2)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK)
    shift = 0.0
    mul = 1.0
    if SINGLE:
        mask = cols < K
        if PRE >= SILU_MUL:
            y = _gated(x_row, 0, cols, K, PRE, X_DTYPE)
        else:
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if PRE == RMS:
                mul = _inv_root_mean(tl.sum(x * x, axis=0), KF, eps)
            elif PRE == LAYER:
                shift = tl.math.div_rn(tl.sum(x, axis=0), KF)
                d = tl.where(mask, x - shift, 0.0)
                mul = _inv_root_mean(tl.sum(d * d, axis=0), KF, eps)
            y = _norm_values(x, w_ptr, b_ptr, 0, cols, K, shift, mul, PRE, X_DTYPE, Y_DTYPE)
        scale = _row_scale(tl.max(tl.abs(y), axis=0))
        tl.store(s_ptr + row, scale)
        code = _quantize(y, scale)
        tl.store(q_row + cols, code, mask=mask)
        if WITH_SUM:
            tl.store(sum_ptr + row, tl.sum(code.to(tl.int32), axis=0))      # zero past K
    else:
        if PRE == RMS:
            ss = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                v = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                ss += v * v
            mul = _inv_root_mean(tl.sum(ss, axis=0), KF, eps)
        elif PRE == LAYER:
            s1 = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                s1 += tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            shift = tl.math.div_rn(tl.sum(s1, axis=0), KF)
            # Variance about the mean (a second pass), not E[x^2] - mean^2, which cancels badly for offset rows.
            s2 = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                v = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                d = tl.where(k0 + cols < K, v - shift, 0.0)
                s2 += d * d
            mul = _inv_root_mean(tl.sum(s2, axis=0), KF, eps)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            amax = tl.maximum(amax, tl.abs(_normed(x_row, w_ptr, b_ptr, k0, cols, K, shift, mul, PRE, X_DTYPE,
                                                   Y_DTYPE)))
        scale = _row_scale(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
        total = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK):
            y = _normed(x_row, w_ptr, b_ptr, k0, cols, K, shift, mul, PRE, X_DTYPE, Y_DTYPE)
            code = _quantize(y, scale)
            tl.store(q_row + k0 + cols, code, mask=k0 + cols < K)
            if WITH_SUM:
                total += code.to(tl.int32)              # zero past K: _normed reads 0 there
        if WITH_SUM:
            tl.store(sum_ptr + row, tl.sum(total, axis=0))


def _launch(x: torch.Tensor, weight, bias, eps: float, pre: tl.constexpr, block: int | None, with_sums=False):
    """Run the row kernel over x [..., K] (a gated activation's x: [..., 2K]) -> (int8 codes [..., K], float32
    scales [..., 1]), and with ``with_sums`` the int32 row sums of the codes [...] as a third element."""
    k = x.shape[-1] // 2 if pre.value >= SILU_MUL.value else x.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    sums = torch.empty((m,), device=x.device, dtype=torch.int32) if with_sums else s
    # The norm's output dtype: x's (LayerNorm), or the promoted x/weight one (LlamaRMSNorm's weight * h).
    y_dtype = torch.promote_types(weight.dtype, x.dtype) if pre == RMS else x.dtype
    blk = block or min(MAX_BLOCK, next_pow2(k))
    if m:
        # Pointers a norm does not read get x's: never dereferenced.
        w = x2d if weight is None else weight.contiguous()
        b = x2d if bias is None else bias.contiguous()
        _row_quant_kernel[(m,)](x2d, w, b, q, s, sums, k, float(k), float(eps), x2d.stride(0), q.stride(0),
                                PRE=pre.value, X_DTYPE=TL_DTYPES[x.dtype], Y_DTYPE=TL_DTYPES[y_dtype],
                                WITH_SUM=with_sums, SINGLE=k <= blk, BLOCK=blk,
                                num_warps=4 if blk < 2048 else 8 if blk <= 4096 else 16)
    out = q.reshape(*x.shape[:-1], k), s.reshape(*x.shape[:-1], 1)
    return (*out, sums.reshape(x.shape[:-1])) if with_sums else out


def quantize_rows(x: torch.Tensor, block: int | None = None, with_sums: bool = False) -> tuple[torch.Tensor, ...]:
    """(int8 codes [..., K], float32 scales [..., 1]), identical to ``ops.quantize_rows_int8(x)``; with
    ``with_sums`` also the int32 sum of each row's codes [...] (the W8A8 GEMM's zero-point correction).

    ``block`` (a power of two) overrides the chunk of a row handled at once (tests use it to force chunking).
    """
    return _launch(x, None, None, 0.0, NONE, block, with_sums)


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm(x) quantized per row: ``quantize_rows_int8(weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype))``.

    K and eps go in as float32 (as torch's fp32 mean and ``var + eps`` use them)."""
    return _launch(x, weight, None, eps, RMS, block)


def layernorm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                       block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LayerNorm(x) (output in x's dtype) quantized per row, as ``quantize_rows_int8(layer_norm(x))``."""
    if bias is None:
        bias = torch.zeros_like(weight)
    return _launch(x, weight, bias, eps, LAYER, block)


def act_mul_quantize(y: torch.Tensor, act: str, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(gate) * up`` over the halves of y [..., 2F], quantized per row: ``ops.act_mul_quant_int8``."""
    return _launch(y, None, None, 0.0, GATED[act], block)


@triton.jit
def _act_mul_kernel(y_ptr, o_ptr, F, stride_ym, stride_om, ACT: tl.constexpr, X_DTYPE: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = _gated(y_ptr + row * stride_ym, 0, cols, F, ACT, X_DTYPE)
    tl.store(o_ptr + row * stride_om + cols, v, mask=cols < F)


def act_mul(y: torch.Tensor, act: str, block: int = 1024) -> torch.Tensor:
    """``act(gate) * up`` over the halves of y [..., 2F] -> [..., F] in y's dtype: ``ops.act_mul`` in one pass."""
    f = y.shape[-1] // 2
    y2d = y.reshape(-1, y.shape[-1])
    if y2d.stride(1) != 1:
        y2d = y2d.contiguous()
    out = torch.empty((y2d.shape[0], f), device=y.device, dtype=y.dtype)
    if out.numel():
        blk = min(block, next_pow2(f))
        _act_mul_kernel[(y2d.shape[0], triton.cdiv(f, blk))](y2d, out, f, y2d.stride(0), out.stride(0),
                                                             ACT=GATED[act].value, X_DTYPE=TL_DTYPES[y.dtype],
                                                             BLOCK=blk, num_warps=4)
    return out.reshape(*y.shape[:-1], f)
