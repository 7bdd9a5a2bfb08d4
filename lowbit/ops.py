"""lowbit's custom operators (torch.library), the contract between quantization passes and kernels.

Each op has a reference kernel written in plain PyTorch (correct on every device, used on CPU and as
the float reference in tests) and a fake kernel so torch.export / torch.compile can trace it. Faster
device kernels (Triton) register against the same op names without changing any caller.

Ops
---
``lowbit::wna16_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual=None)``
    Weight-only quantized linear: ``y = x @ dequant(W).T + bias (+ residual)`` with W [N, K] stored in the packed
    layout of ``lowbit.format.quantize`` (codes uint8 [N, ceil(K*bits/8)], scales f16 [N, G], zeros u8
    [N, G]). Activations stay in float ("a16"); ``group_size`` is the effective group (K when
    per-channel). ``residual`` (shaped like y) is added in the epilogue: what the fusion rule ``residual_add``
    substitutes for ``residual + linear(x)``, so the sum is written once. All three linear ops take it.

``lowbit::w8a8_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features)``
    Both operands integer: the weight as stored above but symmetric (``code - zero`` is its signed value,
    within int8 for any bits <= 8), the activations quantized per token (row) to symmetric INT8 at run
    time by ``quantize_rows_int8``. Products are summed in int32 per weight group, then scaled:
    ``y[m, n] = sx[m] * sum_g acc_g[m, n] * sw[n, g] + bias[n]``: what an INT8 tensor-core kernel computes.

``lowbit::w8a8_linear_codes(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features, dtype)``
    ``w8a8_linear`` on activations quantized already (int8 codes, float32 row scales [..., 1]): what follows
    a fused norm + quantize. Output in ``dtype``.

``lowbit::wna16_embedding(ids, qweight, scales, zeros, bits, group_size, dim, dtype)``
    Quantized embedding table lookup: the rows of W [V, dim] selected by ``ids``, dequantized to
    ``dtype``. Only the gathered rows are unpacked.

``lowbit::attention(q, k, v, mask, scale, kv_groups) -> out``
    Scaled dot-product attention of q [B, H, S, D] over k, v [B, H / kv_groups, T, D] (grouped-query when
    kv_groups > 1), with a boolean or additive mask broadcastable to [B, H, S, T]; returns [B, S, H, Dv], the
    layout the output projection reads. One opaque op in the traced step graph: its shapes are the same
    for prefill and decode, so tracing adds no guard on sequence or cache length (transformers' own
    attention code branches on ``q_len == 1``).

``lowbit::rmsnorm_quant_int8(x, weight, eps) -> (codes, scales)``
    LlamaRMSNorm followed by the per-token INT8 quantization of ``w8a8_linear``, as one op: what the fusion rule
    ``norm_quant_int8`` substitutes for ``norm -> quantize`` so the normalized activations never travel through
    memory in float. ``lowbit::layernorm_quant_int8(x, weight, bias, eps)`` is the same behind LayerNorm.

``lowbit::act_mul(y, act) -> out``
    ``act(gate) * up`` where gate and up are the halves of ``y``'s last dimension (a merged gate/up
    matmul's output); ``act`` is ``silu``, ``gelu`` or ``gelu_tanh``. ``lowbit::act_mul_quant_int8(y, act)
    -> (codes, scales)`` is the same followed by the per-token INT8 quantization of ``w8a8_linear``: what the
    fusion rule ``act_mul`` substitutes so the product never travels through memory in float.

``lowbit::rotate(x, signs, left, right) -> y``
    An orthogonal rotation of x's last dimension K = m p, ``y = x diag(signs) (left^T (x) right)``: x times
    ``signs`` [K], viewed as m x p blocks X, and ``left @ X @ right`` (left [m, m], right [p, p]) viewed back. The
    online rotation before the matmuls whose weights hold its inverse (``passes/rotate.online_pass``); with right
    a normalized Hadamard matrix it costs ``p + m`` multiply-adds per element instead of K.

``lowbit::narrow_linear(x, weight, bias) -> y``
    ``F.linear(x, weight.to(x.dtype), bias)`` for a float weight stored narrower than ``x`` (a bfloat16 head run in
    float32): the weight is widened a block of rows at a time, so memory holds it narrow plus one block. Each
    output is the same dot product in ``x``'s dtype (equal to the wide linear up to the GEMM's summation order).

CUDA kernels: every op but ``wna16_embedding`` and ``attention`` (PyTorch's own kernels serve those) runs a
Triton kernel (``lowbit.kernels.triton``) when Triton is installed and the format is supported, and the
reference math otherwise. Triton is imported on the first CUDA call, never at ``import lowbit``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.format.quantize import dequantize_codes, expand_groups, unpack_codes


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_kernels(name: str):
    """The Triton kernel module ``lowbit.kernels.triton.<name>``, or None without Triton (imported lazily)."""
    from lowbit.kernels.triton import load

    return load(name)


def _add_residual(y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The residual epilogue of the reference kernels (in place on y, a fresh output)."""
    return y if residual is None else y.add_(residual.to(y.dtype))


def wna16_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``wna16_linear`` in plain PyTorch: unpack, dequantize, F.linear (any device)."""
    codes = unpack_codes(qweight, bits, in_features)
    # Dequantize in float32 at least: fp16 (q - z) * s rounds differently from the reference math.
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" else x.dtype
    w = dequantize_codes(codes, scales, zeros, group_size, dtype=compute)
    y = F.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return _add_residual(y, residual).to(x.dtype)


@torch.library.custom_op("lowbit::wna16_linear", mutates_args=())
def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    return wna16_linear_reference(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual)


_FALLBACKS_WARNED: set = set()


def _warn_fallback(op: str, why: str) -> None:
    """Say once per op and reason that a CUDA call runs the (slow, unfused) reference math instead of a kernel."""
    if (op, why) not in _FALLBACKS_WARNED:
        _FALLBACKS_WARNED.add((op, why))
        warnings.warn(f"lowbit: {op} on CUDA runs the reference math, not a Triton kernel: {why}", stacklevel=3)


NO_TRITON = "triton is not installed (pip install 'lowbit[dev]')"


def _matmul_unsupported(kern, dtype: torch.dtype, bits: int, group_size: int, in_features: int) -> Optional[str]:
    """Why a quantized matmul's Triton kernel cannot run (activations or output in ``dtype``), or None."""
    return (NO_TRITON if kern is None
            else f"{dtype} activations or output" if dtype not in FLOAT_DTYPES
            else f"no kernel for {bits}-bit codes in groups of {group_size} with K={in_features}"
            if not kern.supports(bits, group_size, in_features) else None)


def _linear_triton(module: str, launcher: str, reference, x, qweight, scales, zeros, bias, bits: int,
                   group_size: int, in_features: int, residual=None):
    """A quantized linear's CUDA kernel: ``lowbit.kernels.triton.<module>.<launcher>`` on x flattened to 2-D where
    Triton is installed and supports the format, else ``reference``.

    Only shapes, dtypes and formats steer it (no values, no host sync), so it is safe under CUDA graphs.
    """
    kern = _triton_kernels(module)
    if x.numel() == 0:
        return reference(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual)
    why = _matmul_unsupported(kern, x.dtype, bits, group_size, in_features)
    if why is not None:
        _warn_fallback(launcher, why)
        return reference(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual)
    n = qweight.shape[0]
    y = getattr(kern, launcher)(x.reshape(-1, in_features), qweight, scales, zeros, bias, bits, group_size,
                                in_features, residual=None if residual is None else residual.reshape(-1, n))
    return y.reshape(*x.shape[:-1], n)


def wna16_linear_triton(x, qweight, scales, zeros, bias, bits: int, group_size: int, in_features: int,
                        residual=None):
    """The CUDA kernel of wna16_linear: Triton's fused dequant-GEMM where it applies, else the reference."""
    return _linear_triton("w4a16", "wna16_matmul", wna16_linear_reference, x, qweight, scales, zeros, bias, bits,
                          group_size, in_features, residual)


wna16_linear.register_kernel("cuda")(wna16_linear_triton)


@wna16_linear.register_fake
def _wna16_linear_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def dequantized_weight(qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                       dtype=torch.float32) -> torch.Tensor:
    """The float weight [N, K] a wna16_linear computes with (for tests, export and inspection)."""
    return dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros, group_size, dtype)


ACT_QMAX = 127          # symmetric INT8: codes in [-127, 127], so -x quantizes to -q exactly
ACT_EPS = 1e-10         # smallest row scale: an all-zero row quantizes to zeros instead of NaN


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8: (int8 codes [..., K], float32 scales [..., 1]) with x ~ codes * scale.

    The same float32 steps (max|x| / 127, floor at ACT_EPS, divide, round half to even, clip) as the ONNX
    lowering and the GPU kernels, so every backend gets bit-identical codes.
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / ACT_QMAX).clamp_min(ACT_EPS)
    return torch.round(x / scale).clamp(-ACT_QMAX, ACT_QMAX).to(torch.int8), scale


def signed_weight(qweight, zeros, bits: int, in_features: int, group_size: int) -> torch.Tensor:
    """The int8 weight [N, K] (``code - zero``) of a symmetric layer stored in the packed layout."""
    codes = unpack_codes(qweight, bits, in_features).to(torch.int16)
    z = expand_groups(zeros.to(torch.int16), in_features, group_size)
    return (codes - z).to(torch.int8)


# K per float32 GEMM in int8_matmul: every partial sum of int8 products is then an integer of magnitude at most
# 1024 * 128 * 127 < 2^24, which float32 holds exactly, whatever the summation order or instruction set.
F32_EXACT_K = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a [M, K] @ b [N, K].T`` of int8 operands, the same on every CPU.

    On CPU, float32 GEMMs over K chunks of ``F32_EXACT_K`` (exact by construction, and several times faster
    than ``torch._int_mm`` on x86 without VNNI, whose int8 GEMM may also saturate there), the chunks added in
    int32; float64 where float32 matmuls may run in reduced precision (``torch.set_float32_matmul_precision``
    below "highest") and off the CPU (the CUDA path has its own kernel)."""
    if a.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return (a.double() @ b.double().t()).to(torch.int32)
    out = None
    for k0 in range(0, a.shape[1], F32_EXACT_K):
        part = (a[:, k0:k0 + F32_EXACT_K].float() @ b[:, k0:k0 + F32_EXACT_K].float().t()).to(torch.int32)
        out = part if out is None else out + part
    return out


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w8a8_linear`` in plain PyTorch: per-token INT8, exact int32 sums per group, float rescale."""
    xq, sx = quantize_rows_int8(x)
    return w8a8_linear_codes_reference(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features, x.dtype,
                                       residual)


def w8a8_linear_codes_reference(xq: torch.Tensor, sx: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int,
                                in_features: int, dtype: torch.dtype,
                                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w8a8_linear_codes``: the integer matmul and rescale of ``w8a8_linear`` on activations already quantized."""
    lead = xq.shape[:-1]
    xq, sx = xq.reshape(-1, in_features), sx.reshape(-1, 1)
    w = signed_weight(qweight, zeros, bits, in_features, group_size)
    sw = scales.float()
    y = None
    for g, k0 in enumerate(range(0, in_features, group_size)):
        part = int8_matmul(xq[:, k0:k0 + group_size].contiguous(), w[:, k0:k0 + group_size].contiguous()).float()
        part = part * sw[:, g]
        y = part if y is None else y + part
    y = y * sx
    if bias is not None:
        y = y + bias.float()
    return _add_residual(y.reshape(*lead, -1).to(dtype), residual)


@torch.library.custom_op("lowbit::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    return w8a8_linear_reference(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual)


def w8a8_linear_triton(x, qweight, scales, zeros, bias, bits: int, group_size: int, in_features: int,
                       residual=None):
    """The CUDA kernel of w8a8_linear: Triton activation quantization + INT8 GEMM where it applies, else the
    reference."""
    return _linear_triton("w8a8", "w8a8_linear", w8a8_linear_reference, x, qweight, scales, zeros, bias, bits,
                          group_size, in_features, residual)


w8a8_linear.register_kernel("cuda")(w8a8_linear_triton)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, residual=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("lowbit::w8a8_linear_codes", mutates_args=())
def w8a8_linear_codes(xq: torch.Tensor, sx: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    return w8a8_linear_codes_reference(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features, dtype,
                                       residual)


def w8a8_linear_codes_triton(xq, sx, qweight, scales, zeros, bias, bits: int, group_size: int, in_features: int,
                             dtype: torch.dtype, residual=None):
    """The CUDA kernel: the Triton INT8 GEMM of w8a8_linear on the given codes, else the reference."""
    kern = _triton_kernels("w8a8")
    why = _matmul_unsupported(kern, dtype, bits, group_size, in_features)
    if why is not None or xq.numel() == 0:
        if xq.numel():
            _warn_fallback("w8a8_linear_codes", why)
        return w8a8_linear_codes_reference(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features,
                                           dtype, residual)
    n = qweight.shape[0]
    y = kern.w8a8_matmul(xq.reshape(-1, in_features), sx.reshape(-1, 1), qweight, scales, zeros, bias, bits,
                         group_size, in_features, dtype, residual=None if residual is None else residual.reshape(-1, n))
    return y.reshape(*xq.shape[:-1], n)


w8a8_linear_codes.register_kernel("cuda")(w8a8_linear_codes_triton)


@w8a8_linear_codes.register_fake
def _w8a8_linear_codes_fake(xq, sx, qweight, scales, zeros, bias, bits, group_size, in_features, dtype,
                            residual=None):
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=dtype)


@torch.library.custom_op("lowbit::wna16_embedding", mutates_args=())
def wna16_embedding(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    flat = ids.reshape(-1)
    rows = dequantize_codes(unpack_codes(qweight[flat], bits, dim), scales[flat], zeros[flat], group_size,
                            dtype=torch.float32)
    return rows.to(dtype).reshape(*ids.shape, dim)


@wna16_embedding.register_fake
def _wna16_embedding_fake(ids, qweight, scales, zeros, bits, group_size, dim, dtype):
    return torch.empty((*ids.shape, dim), dtype=dtype, device=ids.device)


NARROW_BLOCK_BYTES = 16 << 20         # one widened block of a narrow_linear weight: rows in x's dtype


@torch.library.custom_op("lowbit::narrow_linear", mutates_args=())
def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    out = x2.new_empty((x2.shape[0], n))
    step = max(1, NARROW_BLOCK_BYTES // (k * x.element_size()))
    for r in range(0, n, step):
        out[:, r:r + step] = x2 @ weight[r:r + step].to(x.dtype).t()
    if bias is not None:
        out += bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


@narrow_linear.register_fake
def _narrow_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, kv_groups: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_groups > 1)
    return out.transpose(1, 2).contiguous()


@torch.library.custom_op("lowbit::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              kv_groups: int) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, kv_groups)


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, kv_groups):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, kv_groups = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.kv_groups = scale, kv_groups


def _attention_backward(ctx, grad):
    """Gradients through the reference (passes that differentiate the float graph: passes/budget.py)."""
    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention_reference(*leaves, mask, ctx.scale, ctx.kv_groups)
        gq, gk, gv = torch.autograd.grad(out, leaves, grad)
    return gq, gk, gv, None, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, round to x's dtype, times the weight (promoted dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rmsnorm_quant_int8_reference(x: torch.Tensor, weight: torch.Tensor, eps: float):
    return quantize_rows_int8(rms_norm_reference(x, weight, eps))


@torch.library.custom_op("lowbit::rmsnorm_quant_int8", mutates_args=())
def rmsnorm_quant_int8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_quant_int8_reference(x, weight, eps)


def _row_triton(op: str, launcher: str, reference, x: torch.Tensor, *args):
    """A per-row op's CUDA kernel: ``lowbit.kernels.triton.act_quant.<launcher>(x, *args)`` (one program per
    token) when Triton is installed and every tensor is float, else ``reference(x, *args)``."""
    kern = _triton_kernels("act_quant")
    dtypes = [t.dtype for t in (x, *args) if isinstance(t, torch.Tensor)]
    why = (NO_TRITON if kern is None
           else f"inputs are {', '.join(map(str, dtypes))}" if any(d not in FLOAT_DTYPES for d in dtypes) else None)
    if why is not None or x.numel() == 0:
        if x.numel():
            _warn_fallback(op, why)
        return reference(x, *args)
    return getattr(kern, launcher)(x, *args)


def rmsnorm_quant_int8_triton(x, weight, eps: float):
    """The CUDA kernel: the fused Triton row kernel, else the reference."""
    return _row_triton("rmsnorm_quant_int8", "rmsnorm_quantize", rmsnorm_quant_int8_reference, x, weight, eps)


rmsnorm_quant_int8.register_kernel("cuda")(rmsnorm_quant_int8_triton)


@rmsnorm_quant_int8.register_fake
def _rmsnorm_quant_int8_fake(x, weight, eps):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def layernorm_quant_int8_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                   eps: float):
    return quantize_rows_int8(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


@torch.library.custom_op("lowbit::layernorm_quant_int8", mutates_args=())
def layernorm_quant_int8(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return layernorm_quant_int8_reference(x, weight, bias, eps)


def layernorm_quant_int8_triton(x, weight, bias, eps: float):
    """The CUDA kernel: the fused Triton row kernel (LayerNorm without a weight: a weight of ones), else the
    reference."""
    if weight is None:
        weight = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    return _row_triton("layernorm_quant_int8", "layernorm_quantize", layernorm_quant_int8_reference, x, weight, bias,
                       eps)


layernorm_quant_int8.register_kernel("cuda")(layernorm_quant_int8_triton)


@layernorm_quant_int8.register_fake
def _layernorm_quant_int8_fake(x, weight, bias, eps):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def rotate_reference(x: torch.Tensor, signs: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    k, m, p = x.shape[-1], left.shape[-1], right.shape[-1]
    if signs.shape != (k,) or left.shape != (m, m) or right.shape != (p, p) or m * p != k:
        raise ValueError(f"rotate: signs {list(signs.shape)}, left {list(left.shape)} and right {list(right.shape)} "
                         f"do not rotate a last dimension of {k} (signs [K], left [m, m], right [p, p], m p = K)")
    blocks = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], m, p)
    return (left.to(x.dtype) @ blocks @ right.to(x.dtype)).reshape(x.shape)


@torch.library.custom_op("lowbit::rotate", mutates_args=())
def rotate(x: torch.Tensor, signs: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return rotate_reference(x, signs, left, right)


@rotate.register_fake
def _rotate_fake(x, signs, left, right):
    return torch.empty_like(x)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def act_mul_reference(y: torch.Tensor, act: str) -> torch.Tensor:
    if act not in ACTIVATIONS:
        raise ValueError(f"act_mul: unknown activation {act!r}; one of {', '.join(ACTIVATIONS)}")
    gate, up = y.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


@torch.library.custom_op("lowbit::act_mul", mutates_args=())
def act_mul(y: torch.Tensor, act: str) -> torch.Tensor:
    return act_mul_reference(y, act)


def act_mul_triton(y, act: str):
    """The CUDA kernel: one Triton pass over y (gate and up read once, the product written once), else the
    reference."""
    return _row_triton("act_mul", "act_mul", act_mul_reference, y, act)


act_mul.register_kernel("cuda")(act_mul_triton)


@act_mul.register_fake
def _act_mul_fake(y, act):
    return y.new_empty((*y.shape[:-1], y.shape[-1] // 2))


def act_mul_quant_int8_reference(y: torch.Tensor, act: str):
    return quantize_rows_int8(act_mul_reference(y, act))


@torch.library.custom_op("lowbit::act_mul_quant_int8", mutates_args=())
def act_mul_quant_int8(y: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    return act_mul_quant_int8_reference(y, act)


def act_mul_quant_int8_triton(y, act: str):
    """The CUDA kernel: the Triton row kernel (the product quantized in registers, never stored), else the
    reference."""
    return _row_triton("act_mul_quant_int8", "act_mul_quantize", act_mul_quant_int8_reference, y, act)


act_mul_quant_int8.register_kernel("cuda")(act_mul_quant_int8_triton)


@act_mul_quant_int8.register_fake
def _act_mul_quant_int8_fake(y, act):
    shape = (*y.shape[:-1], y.shape[-1] // 2)
    return y.new_empty(shape, dtype=torch.int8), y.new_empty((*y.shape[:-1], 1), dtype=torch.float32)
