"""CPU kernels of the weight-only quantized matmul (``lowbit::wna16_linear``), on layouts torch's own CPU
kernels read, repacked once when an artifact is loaded.

- Few rows (decode: at most ``SMALL_M`` tokens): ``aten._weight_int4pack_mm_for_cpu`` (4-bit) or
  ``aten._weight_int8pack_mm`` (8-bit per channel) on bfloat16 activations, the one dtype these kernels are
  fast in on x86 (float32 activations ran 8-12x slower on an AVX2 EPYC, float16 50x).
- Many rows (prefill): the weight dequantized to float32, a tile of rows at a time, into a scratch buffer that
  is reused, then a float32 GEMM. The unpacking reads the int4pack layout itself, so one copy of the weight
  serves both paths.

The reference kernel (``ops.wna16_linear_reference``) stays the oracle; formats these kernels do not cover
(2/3-bit codes, groups that are not a multiple of 32) keep it (``cpu_support`` says why).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.format.quantize import unpack_codes

SMALL_M = 16                    # rows up to which the bfloat16 kernels win over dequantize + float32 GEMM
KERNEL_GROUPS = (256, 128, 64, 32)   # the group sizes _weight_int4pack_mm_for_cpu accepts
# The int4pack CPU layouts torch writes, as (rows per block, k values per run of bytes): byte (block, k // run,
# k % run, i) holds row i's code in its low nibble and row block/2 + i's in its high one. Which one torch uses
# depends on the CPU's instruction set (32-row blocks on AVX2, 64-row blocks on AVX-512), so it is probed.
INT4PACK_LAYOUTS = ((32, 4), (64, 1))
TILE_ELEMS = 1 << 21            # float32 elements of weight dequantized at a time (8 MiB of scratch)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@lru_cache(maxsize=None)
def int4pack_layout() -> Optional[tuple[int, int]]:
    """The layout (``INT4PACK_LAYOUTS``) this torch's int4pack CPU kernels pack in on this CPU, or None when it has
    none of them or no kernels. Checked on a probe, since the layout is torch's internal business."""
    if not (hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch, "_weight_int4pack_mm_for_cpu")):
        return None
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 128), dtype=torch.int32, generator=g)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    except RuntimeError:
        return None
    if packed.dtype != torch.uint8 or packed.numel() != q.numel() // 2:
        return None
    for layout in INT4PACK_LAYOUTS:
        out = torch.empty(128, 128)
        if torch.equal(_unpack_rows(packed.view(-1), 128, 128, out, torch.empty(128 * 128, dtype=torch.uint8),
                                    layout), q.float()):
            return layout
    return None


def int4pack_layout_ok() -> bool:
    return int4pack_layout() is not None


def _unpack_rows(packed_bytes: torch.Tensor, rows: int, k: int, out: torch.Tensor, scratch: torch.Tensor,
                 layout: tuple[int, int]):
    """The codes of ``rows`` rows (whole blocks of ``layout``) of an int4pack weight, as float32 [rows, k] in
    ``out`` (``scratch``: rows * k bytes)."""
    block, run = layout
    blocks, half, n = rows // block, block // 2, rows * k // 2
    planar, nibbles = scratch[:n].view(blocks, half, k // run, run), scratch[n:2 * n].view(blocks, half, k)
    planar.copy_(packed_bytes.view(blocks, k // run, run, half).permute(0, 3, 1, 2))
    planar = planar.view(blocks, half, k)
    halves = out.view(blocks, 2, half, k)
    torch.bitwise_and(planar, 15, out=nibbles)
    halves[:, 0].copy_(nibbles)
    torch.bitwise_right_shift(planar, 4, out=nibbles)
    halves[:, 1].copy_(nibbles)
    return out


class _Scratch(threading.local):
    """Per-thread buffers the prefill path dequantizes into, grown to the largest tile seen and then reused:
    a fresh multi-MiB allocation per matmul costs page faults on every call."""

    def __init__(self):
        self.f32 = torch.empty(0)
        self.u8 = torch.empty(0, dtype=torch.uint8)

    def get(self, n: int):
        if self.f32.numel() < n:
            # Normal tensors even when first grown under inference mode, so calls outside it may write them too.
            with torch.inference_mode(False):
                self.f32, self.u8 = torch.empty(n), torch.empty(n, dtype=torch.uint8)
        return self.f32, self.u8


_SCRATCH = _Scratch()


def cpu_support(bits: int, group_size: int, in_features: int) -> Optional[str]:
    """Why ``CpuQuantLinear`` cannot run a format (the reference kernel does), or None."""
    if bits == 8:
        return None
    if bits != 4:
        return f"no CPU kernel for {bits}-bit codes"
    if not int4pack_layout_ok():
        return (f"torch {torch.__version__} lacks the int4pack CPU kernels or packs them in a layout lowbit does not "
                "read on this CPU")
    if group_size < in_features and group_size % 32:
        return f"groups of {group_size} (the int4pack kernels need a multiple of 32)"
    return None


class CpuQuantLinear(torch.nn.Module):
    """``wna16_linear`` of one layer, repacked for the CPU kernels: ``forward(x, residual=None)``.

    Both paths compute ``x @ (code * scale + shift).T (+ bias) (+ residual)`` with the layer's own groups; the
    bfloat16 path rounds x, the scales and its output to bfloat16 (about 3 significant digits: far below the
    4-bit rounding of the weight itself), the float32 path computes what the reference does.
    """

    def __init__(self, qweight, scales, zeros, bias, bits: int, group_size: int, in_features: int):
        super().__init__()
        why = cpu_support(bits, group_size, in_features)
        if why is not None:
            raise ValueError(why)
        n, k = qweight.shape[0], in_features
        self.bits, self.n, self.k, self.group = bits, n, k, group_size
        self.per_channel = scales.shape[1] == 1
        codes = unpack_codes(qweight, bits, k).to(torch.int32)
        if bits == 4:
            # Padded columns meet zero activations and padded rows are sliced off: their codes do not matter.
            self.layout = int4pack_layout()
            self.np_, self.kp = _round_up(n, self.layout[0]), _round_up(k, 32)
            self.kernel_group = next(g for g in KERNEL_GROUPS
                                     if self.kp % g == 0 and (self.per_channel or group_size % g == 0))
            codes = F.pad(codes, (0, self.kp - k, 0, self.np_ - n))
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 2))
            offset = 0      # the unpacked codes are the stored ones
        else:
            # Signed codes, so the per-channel int8 kernel's weight holds every code: (c - 128) * s + (128 - z) * s.
            self.np_, self.kp = n, k
            self.kernel_group = k if self.per_channel else math.gcd(group_size, k)
            self.register_buffer("packed", (codes - 128).to(torch.int8))
            offset = 128
        # Scale and shift per kernel group (each inside one of the layer's groups): w = stored code * s + shift.
        owner = (torch.arange(self.kp // self.kernel_group) * self.kernel_group // group_size).clamp_max(
            scales.shape[1] - 1)
        scale = F.pad(scales.float()[:, owner], (0, 0, 0, self.np_ - n))
        shift = F.pad(((offset - zeros.float()) * scales.float())[:, owner], (0, 0, 0, self.np_ - n))
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        if bits == 4:
            # The int4pack kernel computes (q - 8) * s + z.
            self.register_buffer("scales_zeros", torch.stack((scale, shift + 8 * scale), -1).transpose(0, 1)
                                 .to(torch.bfloat16).contiguous())
        elif self.per_channel:
            self.register_buffer("scale_bf16", scale[:, 0].to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.float())
        self.small_ok = bits == 4 or self.per_channel      # int8pack has no groups: grouped 8-bit dequantizes

    def extra_repr(self) -> str:
        return f"{self.bits}-bit, N={self.n}, K={self.k}, group={self.group}"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        # One step calls this ~120 times on the demo LM: the few-row path is written for the fewest tensor ops
        # (each costs microseconds next to a ~60 us kernel call).
        n = self.n
        x2 = x.reshape(-1, self.k)
        if x2.shape[0] <= SMALL_M and self.small_ok:
            xb = x2.to(torch.bfloat16)
            if self.bits == 4:
                if self.kp != self.k:
                    xb = F.pad(xb, (0, self.kp - self.k))
                y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.kernel_group, self.scales_zeros)
                if self.np_ != n:
                    y = y[:, :n]
            else:
                y = torch._weight_int8pack_mm(xb, self.packed, self.scale_bf16).float()
                y.addmm_(x2.float().sum(-1, keepdim=True), self.shift.t())
            # A float32 residual promotes the bfloat16 product in the one add that writes the output.
            y = y.float() if residual is None else torch.add(residual.reshape(-1, n), y)
        else:
            y = self._dequant_gemm(x2)                                    # a fresh float32 [M, N]
            if residual is not None:
                y.add_(residual.reshape(-1, n))
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(x.shape[:-1] + (n,))

    def _dequant_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        xf = x2.float()
        block = self.layout[0] if self.bits == 4 else 1
        rows = max(block, TILE_ELEMS // self.kp // block * block)
        f32, u8 = _SCRATCH.get(min(rows, self.np_) * self.kp)
        out = xf.new_empty((xf.shape[0], self.np_))
        for n0 in range(0, self.np_, rows):
            t = min(rows, self.np_ - n0)
            w = self._dequant_rows(n0, t, f32[:t * self.kp].view(t, self.kp), u8)
            torch.mm(xf, w[:, :self.k].t(), out=out if t == self.np_ else out[:, n0:n0 + t])
        return out[:, :self.n]

    def _dequant_rows(self, n0: int, t: int, w: torch.Tensor, u8: torch.Tensor) -> torch.Tensor:
        """Rows n0 .. n0 + t of the float32 weight in ``w`` [t, kp]."""
        if self.bits == 4:
            half = self.kp // 2
            _unpack_rows(self.packed.view(-1)[n0 * half:(n0 + t) * half], t, self.kp, w, u8, self.layout)
        else:
            w.copy_(self.packed[n0:n0 + t])
        groups = w.view(t, -1, self.kernel_group)
        groups.mul_(self.scale[n0:n0 + t, :, None]).add_(self.shift[n0:n0 + t, :, None])
        return w
