"""The artifact's weights as one or more safetensors files, written as tensors arrive.

A small model's tensors go to ``weights.safetensors`` as before; once more than ``limit`` bytes are pending they
are written as a shard, so a streaming compile holds at most one shard's tensors, and the files are named
``weights-00001-of-0000N.safetensors`` when there is more than one. The runtime reads every file of either form
the manifest lists (``weight_files``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.format.safetensors_file import read_header, read_tensor

SINGLE = "weights.safetensors"
SHARD_RE = re.compile(r"weights-(\d{5})-of-(\d{5})\.safetensors")
# Bytes of tensors held before a shard is written: what a streaming compile keeps of the artifact in memory.
SHARD_BYTES = 512 << 20
RECOMPILE = "recompile the artifact"          # the fix for an unreadable weight file of an artifact


class ShardWriter:
    """Collects ``add``-ed tensors into shard files in ``folder``; ``close`` names them and returns the names."""

    def __init__(self, folder: Path, metadata: dict, limit: Optional[int] = None):
        self.folder, self.metadata, self.limit = Path(folder), metadata, limit or SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[str] = []
        self.keys: set[str] = set()
        self.nbytes = 0

    def add(self, key: str, tensor: torch.Tensor):
        if key in self.keys:
            raise LowbitError(f"tensor '{key}' written twice to the artifact; report this")
        self.keys.add(key)
        self.pending[key] = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.nbytes += size
        if self.pending_bytes >= self.limit:
            self._flush()

    def _flush(self):
        name = f".part-{len(self.parts):05d}.safetensors"
        write_safetensors(self.folder / name, self.pending, self.metadata)
        self.parts.append(name)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending and give the files their names: [weights.safetensors] or the numbered shards."""
        if self.pending or not self.parts:
            self._flush()
        n = len(self.parts)
        names = [SINGLE] if n == 1 else [f"weights-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for part, name in zip(self.parts, names):
            (self.folder / part).rename(self.folder / name)
        return names


# safetensors' dtype order: a file's tensors are laid out by dtype, this order reversed, then by name.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """The file ``safetensors.torch.save_file`` writes (byte for byte), each tensor's bytes written from its own
    memory: save_file copies every tensor into one buffer first, twice the memory of what it writes."""
    from lowbit.format.safetensors_file import DTYPES

    names = {v: k for k, v in DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-_DTYPE_ORDER.index(names[tensors[k].dtype]), k))
    header, offset = {"__metadata__": metadata}, 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = tensors[k].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def weight_files(names) -> list[str]:
    """The artifact's weight files among ``names`` (its manifest's file list), in order: the single file, or every
    numbered shard (all N of them, or a LowbitError naming what is missing)."""
    names = set(names)
    if SINGLE in names:
        return [SINGLE]
    shards = sorted(n for n in names if SHARD_RE.fullmatch(n))
    if not shards:
        raise LowbitError(f"the artifact's {SINGLE} (or its weights-NNNNN-of-NNNNN.safetensors shards) is not listed "
                          "in its manifest; recompile")
    total = int(SHARD_RE.fullmatch(shards[0]).group(2))
    want = [f"weights-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    if shards != want:
        missing = sorted(set(want) - set(shards)) or sorted(set(shards) - set(want))
        raise LowbitError(f"the artifact's weight shards are incomplete or inconsistent ({missing[0]}); recompile")
    return want


def weight_entries(folder: Path, files: list[str], where: str) -> dict:
    """{tensor name: (file path, its safetensors_file.Entry)} of the weight ``files`` in ``folder``, headers checked,
    nothing read (a name in two files is refused)."""
    entries: dict = {}
    for name in files:
        path = Path(folder) / name
        part = read_header(path, RECOMPILE)
        twice = set(part) & set(entries)
        if twice:
            raise LowbitError(f"{where}: tensor '{sorted(twice)[0]}' is in two weight files; recompile")
        entries.update({key: (path, e) for key, e in part.items()})
    return entries


def read_weight(path: Path, entry) -> torch.Tensor:
    """One tensor of a weight file (``weight_entries``), read into memory of its own."""
    with open(path, "rb") as f:
        return read_tensor(f, entry, fix=RECOMPILE)


def load_weights(folder: Path, files: list[str], where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the weight ``files`` in ``folder`` by name, each read into memory of its own
    (``safetensors_file``: no memory map, whose pages would stay resident beside the copies the runtime makes of
    packed layers)."""
    return {key: read_weight(path, e) for key, (path, e) in weight_entries(folder, files, where).items()}
