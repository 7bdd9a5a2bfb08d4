"""Device and dtype choice shared by the compiler (where passes run) and the torch runtime (where models run)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from lowbit.errors import LowbitError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> str:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise LowbitError(f"unknown --device '{device}'; valid: auto, cpu, cuda, cuda:N")
    return device


def pick_dtype(dtype: Optional[Union[str, torch.dtype]], device: str) -> torch.dtype:
    """The runtime dtype of float tensors: given, or float16 on CUDA (the Triton kernels' fast path) and float32
    on CPU (the reference kernels' exact path)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    named = named_dtype(dtype or "auto")
    if named is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    return named


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how manifests and messages name a dtype."""
    return str(dtype).replace("torch.", "")


def named_dtype(dtype: str) -> Optional[torch.dtype]:
    """The float dtype a --dtype value names; None for 'auto'."""
    if dtype != "auto" and dtype not in DTYPES:
        raise LowbitError(f"unknown --dtype '{dtype}'; valid: auto, {', '.join(DTYPES)}")
    return DTYPES.get(dtype)
