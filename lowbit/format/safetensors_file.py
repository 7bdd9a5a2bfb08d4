"""A safetensors file read one tensor at a time with plain reads, its header checked as untrusted input.

``safetensors.safe_open`` memory-maps the whole file, and every page a read touches stays in the process's
resident set until the map is closed: reading a 16 GB checkpoint through it shows 16 GB of RSS. Here each tensor
is read into its own buffer at its offset, so memory holds only the tensors the caller keeps. The header must be
a JSON object of entries with a known dtype, a shape and in-bounds offsets whose length matches the shape.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 << 20             # safetensors' own limit on the JSON header
RESAVE = "re-save it with save_pretrained()"      # the fix for a bad checkpoint file; an artifact's is to recompile


@dataclass(frozen=True)
class Entry:
    dtype: str                     # the safetensors dtype name, e.g. "BF16"
    shape: tuple
    start: int                     # absolute byte offsets in the file
    end: int


def read_header(path: Path, fix: str = RESAVE) -> dict[str, Entry]:
    """{tensor name: Entry} of the file at ``path``; a malformed or truncated file is one LowbitError line ending
    in ``fix``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            n, = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file")
            doc = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise LowbitError(f"cannot read '{path}': {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"'{path}' is not a safetensors file ({str(e)[:120]}); {fix}"
                          ) from None
    if not isinstance(doc, dict):
        raise LowbitError(f"'{path}': the safetensors header is not a JSON object; {fix}")
    base, entries = 8 + n, {}
    for name, e in doc.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, e, base, size, fix)
    return entries


def _entry(path: Path, name: str, e, base: int, size: int, fix: str) -> Entry:
    bad = f"'{path}': tensor '{str(name)[:80]}' has a malformed header entry"
    if not (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2):
        raise LowbitError(f"{bad}; {fix}")
    shape, (b, end) = e["shape"], e["data_offsets"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, b, end)):
        raise LowbitError(f"{bad} (shape and offsets must be non-negative integers)")
    nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[e["dtype"]]).element_size()
    if end - b != nbytes or base + end > size:
        raise LowbitError(f"{bad}: its {end - b} bytes do not hold shape {shape} of {e['dtype']} inside the file "
                          f"(truncated or corrupt); {fix}")
    return Entry(e["dtype"], tuple(shape), base + b, base + end)


# Bytes read at a time when a tensor is converted as it is read.
CHUNK = 64 << 20


def read_tensor(f, entry: Entry, dtype: Optional[torch.dtype] = None, fix: str = RESAVE) -> torch.Tensor:
    """The tensor ``entry`` describes, read from the open binary file ``f`` into memory of its own; with ``dtype``,
    converted chunk by chunk as it is read (memory for the result, not the result and the stored form)."""
    stored = DTYPES[entry.dtype]
    if dtype is None or dtype == stored or len(entry.shape) == 0:
        t = _read(f, entry.start, entry.end - entry.start, fix).view(stored).reshape(entry.shape)
        return t if dtype is None else t.to(dtype)
    out = torch.empty(entry.shape, dtype=dtype)
    flat = out.view(-1)
    size = torch.empty((), dtype=stored).element_size()
    step = max(1, CHUNK // size)
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = _read(f, entry.start + i * size, n * size, fix).view(stored)
    return out


def _read(f, offset: int, nbytes: int, fix: str) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(offset)
    if nbytes and f.readinto(buf.numpy()) != nbytes:
        raise LowbitError(f"'{f.name}' ends inside tensor data (truncated); {fix}")
    return buf
