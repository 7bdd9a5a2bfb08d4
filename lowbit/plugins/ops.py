"""lowbit's custom operators (torch.library), the contract between quantization passes and kernels.

Each op has a reference kernel written in plain PyTorch (correct on every device, used on CPU and as
the float reference in tests) and a fake kernel so torch.export / torch.compile can trace it. Faster
device kernels (Triton) register against the same op names without changing any caller.

Ops
---
``lowbit::wna16_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features)``
    Weight-only quantized linear: ``y = x @ dequant(W).T + bias`` with W [N, K] stored in the packed
    layout of ``lowbit.passes.quantize`` (codes uint8 [N, ceil(K*bits/8)], scales f16 [N, G], zeros u8
    [N, G]). Activations stay in float ("a16"); ``group_size`` is the effective group (K when
    per-channel).

``lowbit::wna16_embedding(ids, qweight, scales, zeros, bits, group_size, dim, dtype)``
    Quantized embedding table lookup: the rows of W [V, dim] selected by ``ids``, dequantized to
    ``dtype``. Only the gathered rows are unpacked.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.passes.quantize import dequantize_codes, unpack_codes


@torch.library.custom_op("lowbit::wna16_linear", mutates_args=())
def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int) -> torch.Tensor:
    codes = unpack_codes(qweight, bits, in_features)
    # Dequantize in float32 at least: fp16 (q - z) * s rounds differently from the reference math.
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" else x.dtype
    w = dequantize_codes(codes, scales, zeros, group_size, dtype=compute)
    y = F.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return y.to(x.dtype)


@wna16_linear.register_fake
def _wna16_linear_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def dequantized_weight(qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                       dtype=torch.float32) -> torch.Tensor:
    """The float weight [N, K] a wna16_linear computes with (for tests, export and inspection)."""
    return dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros, group_size, dtype)


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
