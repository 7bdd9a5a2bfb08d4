"""Constants a lowering reads only when it writes them, so a big model's weights are never all in memory.

The ONNX lowering builds its graph from the staged program's shapes and dtypes (``staged_program(defer=True)``).
Each large stored tensor is a ``Deferred``: its shape, its dtype and how to read it from the staged weight files.
The lowering's own changes to it (a repack into ONNX Runtime's layout, a transpose, a wider dtype) make new
``Deferred`` values; each is computed when the ONNX file is written, row block by row block where it can be,
and dropped after.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

# Stored tensors at least this large are deferred; smaller ones (norm weights, scales of one layer) are read at once.
DEFER_BYTES = 1 << 20
# Bytes of one row block a Deferred hands out at a time when it is written.
BLOCK_BYTES = 64 << 20


class Deferred:
    """A tensor not read yet: ``read()`` gives it (in any dtype); its value is that converted to ``dtype``,
    transposed when ``transpose`` (2-d only)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, read: Callable[[], torch.Tensor],
                 transpose: bool = False):
        self.shape, self.dtype, self._read, self._transpose = torch.Size(shape), dtype, read, transpose

    def t(self) -> "Deferred":
        rows, cols = self.shape
        return Deferred((cols, rows), self.dtype, self._read, not self._transpose)

    def to(self, dtype: torch.dtype) -> "Deferred":
        return self if dtype == self.dtype else Deferred(self.shape, dtype, self._read, self._transpose)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def stride(self) -> tuple:
        return self.meta().stride()

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def materialize(self) -> torch.Tensor:
        t = self._read()
        return (t.t() if self._transpose else t).to(self.dtype).contiguous()

    def row_blocks(self) -> Iterator[torch.Tensor]:
        """The value in blocks of leading rows, each contiguous (memory for the stored tensor and one block)."""
        t = self._read()
        if t.dim() == 0:
            yield t.to(self.dtype)
            return
        row_bytes = max(1, self.numel() // max(1, self.shape[0]) * self.element_size())
        step = max(1, BLOCK_BYTES // row_bytes)
        for r in range(0, self.shape[0], step):
            part = t[:, r:r + step].t() if self._transpose else t[r:r + step]
            yield part.to(self.dtype).contiguous()


def materialized(x):
    """``x`` read, when it is a ``Deferred``."""
    return x.materialize() if isinstance(x, Deferred) else x


def deferred_call(fn: Callable[..., dict], args: tuple, shape_only: Sequence[bool] = ()) -> dict:
    """``fn(*args)`` (a dict of tensors and plain values) when some ``args`` are ``Deferred``: ``fn`` runs on meta
    tensors for the shapes (the Deferred arguments and those ``shape_only`` marks), and each output that comes
    out on the meta device is a ``Deferred`` that runs ``fn`` on the real arguments when read (once for all of
    them while they are read in turn)."""
    if not any(isinstance(a, Deferred) for a in args):
        return fn(*args)
    marks = list(shape_only) + [False] * (len(args) - len(shape_only))
    out = fn(*[a.meta() if isinstance(a, Deferred) else a.to("meta") if m else a for a, m in zip(args, marks)])
    later = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_meta]
    held: dict = {}

    def read(key: str) -> torch.Tensor:
        if key not in held:
            held.clear()
            real = fn(*[materialized(a) for a in args])
            held.update({k: real[k] for k in later})
        return held.pop(key)

    return {**out, **{k: Deferred(out[k].shape, out[k].dtype, lambda k=k: read(k)) for k in later}}
