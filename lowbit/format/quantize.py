"""Shared quantization math: the single source of truth for lowbit's weight formats.

Every pass (RTN, GPTQ, ZeroQuant) produces the same thing: integer codes, per-group scales and per-group
integer zero points for a weight in [out_features N, in_features K] orientation. Every kernel (CPU
reference, Triton, ONNX translation) reads the same thing. Keeping the math in one module is what makes
"quantize here, dequantize there" bit-exact.

Conventions
-----------
- Groups run along K: group j covers columns [j*g, min((j+1)*g, K)); the last group may be ragged
  (SmolLM2 has K=576, so g=128 leaves a group of 64). g = K (``group_size <= 0`` in recipes) is
  per-channel.
- Codes are unsigned, ``q in [0, 2^bits - 1]``; ``w ~= (q - z) * s``.
- Asymmetric: the range [min(w,0), max(w,0)] maps onto [0, 2^bits-1]; z is an integer in that range.
- Symmetric: z = 2^(bits-1) fixed, the signed [-2^(b-1), 2^(b-1)-1] grid TensorRT/ONNX use, shifted. Up to
  4 bits the group's value of largest magnitude m lands exactly on the bottom code: s = m / -2^(bits-1) (negative
  when m is), all 2^bits levels in use, a step of max|w| / 2^(bits-1) (ONNX Runtime's and GGML's symmetric
  grid; the 2^bits-1 level grid max|w| / (2^(bits-1)-1) cost the demo LM's INT4 16% perplexity). 8 bits keep
  s = max|w| / 127, codes z +- 127, so W8A8's integer weights stay in [-127, 127].
- Scales are stored in float16 (the format GPU kernels and the GPTQ checkpoint read); codes are
  computed *against the float16-rounded scale* so that stored codes + stored scales reproduce the
  dequantized weight the pass measured.
- Packed codes: a little-endian bitstream per output row, uint8 [N, ceil(K*bits/8)]. For 4 bits this is
  two codes per byte, low nibble first; for 8 bits it is the codes themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
MIN_BITS, MAX_BITS = 2, 8
ACT_BITS = (0, 8)          # activation bits: float, or per-token INT8


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized. ``group_size <= 0`` means per output channel (one group = K)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    # Activations at this matmul's input: 0 keeps them float (weight-only, "a16"); 8 quantizes them per token
    # to symmetric INT8 at run time (W8A8), which needs symmetric weights so both operands are integers.
    act_bits: int = 0

    def __post_init__(self):
        if not (MIN_BITS <= self.bits <= MAX_BITS):
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be one of {ACT_BITS}, got {self.act_bits}")

    @property
    def linear_op(self) -> str:
        """The ``lowbit::`` op a matmul with this spec lowers to."""
        return "w8a8_linear" if self.act_bits else "wna16_linear"

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, k: int) -> int:
        """The effective group size for a weight with ``k`` input columns."""
        return k if self.group_size <= 0 or self.group_size >= k else self.group_size

    def describe(self) -> str:
        g = "ch" if self.group_size <= 0 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'-sym' if self.sym else ''}" + (f"-a{self.act_bits}" if self.act_bits else "")


def num_groups(k: int, group: int) -> int:
    return math.ceil(k / group)


def block_groups(k: int, block: int, group: int, n_groups: int) -> torch.Tensor:
    """For K split into blocks of ``block`` (a divisor of ``group``; the last block padded), the index of the
    lowbit group each block belongs to: blocks never straddle groups, so a block takes its group's scale."""
    return torch.clamp(torch.arange(-(-k // block)) * block // group, max=n_groups - 1)


def expand_groups(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-column values (handles the ragged last group)."""
    return t.repeat_interleave(group, dim=1)[:, :k]


def compute_qparams(w: torch.Tensor, spec: QuantSpec, mse: bool = False, grid: int = 100,
                    max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float16 [N, G]) and integer zero points (uint8 [N, G]) for weight w [N, K].

    By min/max; with ``mse`` the range of each group is shrunk by the factor in (1 - max_shrink, 1] (steps
    of 1/grid) that minimizes sum |w - deq(q(w))|^norm over the group (the GPTQ reference's clipping search).
    """
    n, k = w.shape
    g = spec.group(k)
    ng = num_groups(k, g)
    pad = ng * g - k
    wg = range_groups(w.detach().float(), g)
    wmin, wmax = wg.amin(dim=2), wg.amax(dim=2)
    scale, zero = qparams_from_range(wmin, wmax, spec)
    if not mse:
        return scale, zero
    valid = torch.ones(ng, g, device=w.device)
    if pad:
        valid[-1, g - pad:] = 0          # padding columns do not count in the error
    best = torch.full((n, ng), float("inf"), device=w.device)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s1, z1 = qparams_from_range(p * wmin, p * wmax, spec)
        sf, zf = s1.float().unsqueeze(-1), z1.float().unsqueeze(-1)
        q = torch.clamp(torch.round(wg / sf) + zf, 0, spec.maxq)
        err = (((q - zf) * sf - wg).abs_().pow_(norm) * valid).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def range_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], the ragged group padded with its own first column so padding never widens its
    range."""
    n, k = w.shape
    ng = num_groups(k, group)
    pad = ng * group - k
    if pad:
        w = torch.cat([w, w[:, (ng - 1) * group:][:, :1].expand(n, pad)], dim=1)
    return w.view(n, ng, group)


def qparams_from_range(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec, ste: bool = False):
    """Scale and zero from per-group min/max (any shape); shared by RTN and the GPTQ group scan. With ``ste`` the
    same values as float32 tensors that pass gradients to wmin and wmax (the zero point's rounding as the identity),
    for a clip range learned by gradient descent (passes/lkd.py)."""
    rnd = round_ste if ste else torch.round
    maxq = spec.maxq
    if spec.sym:
        half = 1 << (spec.bits - 1)
        if spec.bits == 8:
            scale = torch.maximum(wmin.abs(), wmax.abs()) / (half - 1)
        else:
            scale = torch.where(wmin.abs() > wmax.abs(), wmin, wmax) / -half
        scale = _safe_scale(scale)
        zero = torch.full_like(scale, float(half))
    else:
        lo = torch.clamp(wmin, max=0.0)
        hi = torch.clamp(wmax, min=0.0)
        scale = _safe_scale((hi - lo) / maxq)
        zero = torch.clamp(rnd(-lo / scale), 0, maxq)
    if ste:
        return scale, zero
    return scale.to(SCALE_DTYPE), zero.to(torch.uint8)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, the identity's gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has range 0; any nonzero scale represents it exactly (code == zero). Round to
    # float16 here, its magnitude clamped to the normal range, so codes are computed against the stored scale.
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return (scale.sign() * scale.abs().clamp(min=2.0**-14, max=65504.0)).to(SCALE_DTYPE).float()


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group] view, the ragged tail zero-padded (callers slice back to K)."""
    n, k = t.shape
    pad = (-k) % group
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.view(n, -1, group)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes uint8 [N, K] for w [N, K] against per-group scale/zero [N, G]."""
    n, k = w.shape
    g = spec.group(k)
    wg = _grouped(w.detach().float(), g)
    q = torch.round(wg / scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1)).clamp_(0, spec.maxq)
    return q.view(n, -1)[:, :k].to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - z) * s over groups of ``group`` columns -> [N, K] in ``dtype``."""
    n, k = q.shape
    qg = _grouped(q.to(dtype), group)
    w = (qg - zero.to(dtype).unsqueeze(-1)).mul_(scale.to(dtype).unsqueeze(-1))
    return w.view(n, -1)[:, :k]


# A group is an outlier when its quantization step |s| (the resolution each of its weights is rounded to) is over
# this multiple of its layer's median step: one weight far outside the rest of its group stretches the step until
# the others round to the zero point. The step, not the realized error, tells that apart: a collapsed group's error
# is bounded by its own small weights (about 100x the median squared error at 4 bits), which ordinary rows of
# another scale also reach (SmolLM2-135M at w4g64, w4g128, w8g128: up to 440x in squared error but 19x in step).
OUTLIER_STEP_RATIO = 100.0
MAX_LISTED_OUTLIERS = 8        # outlier groups listed per layer (the count covers them all)


def group_error_stats(w: torch.Tensor, deq: torch.Tensor, scales: torch.Tensor, group: int) -> dict:
    """Per-group error of a quantized weight w [N, K] (``deq`` dequantized, ``scales`` [N, G]) as plain JSON numbers:
    the layer's mean |error| and median group MSE, the group of largest MSE, and the outlier groups
    (OUTLIER_STEP_RATIO, largest step first), each as row, group index, max |error|, MSE, MSE over the median and
    step over the median step."""
    err = (deq.detach().float() - w.detach().float()).abs_()     # in place from here: a weight-sized copy at most
    n, k = err.shape
    cols = torch.full((num_groups(k, group),), float(group), device=err.device)
    cols[-1] = k - (cols.numel() - 1) * group                       # the ragged last group's own columns
    max_abs = _grouped(err, group).amax(-1)
    mean_abs = float(err.mean())
    mse = _grouped(err.square_(), group).sum(-1) / cols              # zero padding adds nothing
    step = _group_steps(w, scales, group)
    live = step[step > 0]
    median_step = float(live.median()) if live.numel() else 0.0
    median_mse = float(mse.median())
    flat = step.flatten()
    outlier = flat > OUTLIER_STEP_RATIO * median_step if median_step else torch.zeros_like(flat, dtype=torch.bool)
    n_out = int(outlier.sum())
    listed = torch.topk(torch.where(outlier, flat, -1.0), min(n_out, MAX_LISTED_OUTLIERS)).indices

    def entry(i: int) -> dict:
        r, g = divmod(int(i), mse.shape[1])
        return {"row": r, "group": g, "max_abs_err": _sig(max_abs[r, g]), "mse": _sig(mse[r, g]),
                "mse_ratio": _ratio(mse[r, g], median_mse), "step_ratio": _ratio(step[r, g], median_step)}

    return {"weight_mean_abs_err": _sig(mean_abs), "group_mse_median": _sig(median_mse),
            "worst_group": entry(mse.flatten().argmax()), "outlier_groups": n_out,
            "outliers": [entry(i) for i in listed]}


def _group_steps(w: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """|scale| per group [N, G], 0 for an all-zero group (its stored scale is a placeholder, not a step)."""
    wg = _grouped(w.detach().float(), group)
    nonzero = (wg.amax(-1) != 0) | (wg.amin(-1) != 0)                  # zero padding cannot make a group nonzero
    return scales.detach().float().abs().to(nonzero.device) * nonzero


def _ratio(x, typical: float) -> float:
    """x over the layer's typical value, in Python floats: float32 could overflow to inf, which JSON cannot hold."""
    return _sig(float(x) / max(typical, torch.finfo(torch.float32).tiny))


def _sig(x) -> float:
    """A plain float to 4 significant digits: errors span many decades, so fixed decimals would zero them."""
    return float(f"{float(x):.4g}")


def quantize_weight(w: torch.Tensor, spec: QuantSpec, mse: bool = False):
    """Round-to-nearest quantization of w [N, K]: returns (codes uint8 [N,K], scale f16 [N,G], zero u8 [N,G])."""
    scale, zero = compute_qparams(w, spec, mse=mse)
    return quantize_codes(w, scale, zero, spec), scale, zero


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize (the float weight the quantized layer effectively uses)."""
    q, s, z = quantize_weight(w, spec)
    return dequantize_codes(q, s, z, spec.group(w.shape[1]), dtype=w.dtype)


def packed_cols(k: int, bits: int) -> int:
    return math.ceil(k * bits / 8)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> little-endian bitstream per row, uint8 [N, ceil(K*bits/8)]."""
    n, k = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-k) % per
        if pad:
            q = torch.cat([q, q.new_zeros(n, pad)], dim=1)
        out = q[:, 0::per].clone()
        for i in range(1, per):
            out |= q[:, i::per] << (i * bits)
        return out
    bitplanes = (q.unsqueeze(-1).to(torch.int32) >> torch.arange(bits, dtype=torch.int32)) & 1
    stream = bitplanes.reshape(n, k * bits)
    pad = (-stream.shape[1]) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(n, pad)], dim=1)
    stream = stream.view(n, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(dim=2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [N, ceil(K*bits/8)] -> uint8 codes [N, K]."""
    n = packed.shape[0]
    if bits == 8:
        return packed[:, :k]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        q = (packed.unsqueeze(-1) >> shifts) & mask
        return q.reshape(n, -1)[:, :k]
    bitsout = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = bitsout.reshape(n, -1)[:, : k * bits].view(n, k, bits).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(dim=2).to(torch.uint8)


def storage_bytes(n: int, k: int, spec: QuantSpec) -> int:
    """Bytes of a quantized weight as stored: packed codes + float16 scales + uint8 zeros."""
    g = spec.group(k)
    return n * packed_cols(k, spec.bits) + n * num_groups(k, g) * (2 + 1)


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias, bits, group_size,
                 k, where: str) -> None:
    """Refuse a quantized weight whose tensors do not have the layout its arguments describe (a kernel would
    read past them, or unpack garbage): ``bits`` 1-8, ``group_size`` and K positive, codes uint8
    [N, ceil(K*bits/8)], scales float [N, G] and zeros uint8 [N, G] with G = ceil(K/group_size), bias [N]."""
    from lowbit.errors import LowbitError

    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group_size, k)) \
            or not 1 <= bits <= 8 or group_size < 1 or k < 1:
        raise LowbitError(f"{where}: bits {bits!r}, group {group_size!r}, K {k!r} out of range (bits 1-8, positive "
                          "group and K)")
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    g = num_groups(k, group_size)
    expect = [(qweight, torch.uint8, (n, packed_cols(k, bits)), "codes"), (zeros, torch.uint8, (n, g), "zeros"),
              (scales, None, (n, g), "scales")] + ([(bias, None, (n,), "bias")] if bias is not None else [])
    for t, dtype, shape, what in expect:
        if n < 0 or tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) \
                or (dtype is None and not t.is_floating_point()):
            raise LowbitError(f"{where}: {what} are {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, but "
                              f"{bits}-bit codes of K={k} in groups of {group_size} need "
                              f"{str(dtype or 'float').removeprefix('torch.')} {list(shape)}")
