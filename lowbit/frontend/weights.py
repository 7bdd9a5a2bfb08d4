"""A model folder's weights, one tensor at a time: ``model.safetensors``, or the shards a
``model.safetensors.index.json`` lists, memory-mapped and read in their stored dtype when asked for. What the
streaming compile binds to a weightless trace (frontend/skeleton.py) block by block, instead of loading the model.

The folder is untrusted input: the index must be a JSON object mapping tensor names to plain file names in the
folder (no paths, no links out of it), every listed file must exist, and a name the checkpoint lacks is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _shard_map(folder: Path) -> dict[str, str]:
    """{tensor name: file name} of the folder's checkpoint, every file checked to be a plain file inside it."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        try:
            doc = json.loads(index.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowbitError(f"cannot read {index}: {e}") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise LowbitError(f"{index}: 'weight_map' must map tensor names to shard file names; re-save the model "
                              "with save_pretrained()")
    elif (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            weight_map = {name: SINGLE for name in f.keys()}
    else:
        raise LowbitError(f"'{folder}' has no {SINGLE} and no {INDEX}; lowbit reads safetensors checkpoints "
                          "(re-save the model with save_pretrained(), which writes them)")
    root = folder.resolve()
    for file in set(weight_map.values()):
        path = folder / file
        if Path(file).name != file or file in ("", ".", "..") or not file.endswith(".safetensors"):
            raise LowbitError(f"{folder / INDEX}: shard '{file}' is not a .safetensors file name in the model "
                              "folder; an index names its shards without paths")
        if not path.is_file() or path.resolve().parent != root:
            raise LowbitError(f"shard '{file}' listed in {folder / INDEX} is missing or lies outside '{folder}'")
    return weight_map


class CheckpointWeights:
    """Read-only access to a checkpoint's tensors by name; each ``read`` copies one tensor out of its mapped shard."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = _shard_map(self.folder)
        self._open: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise LowbitError(f"the checkpoint in '{self.folder}' has no tensor '{name}'; its weights do not match "
                              "config.json (re-save the model with save_pretrained())")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt")
        return self._open[file]

    def shape_dtype(self, name: str) -> tuple[tuple, str]:
        """(shape, safetensors dtype name) of ``name`` without reading it."""
        s = self._handle(name).get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, or converted to ``dtype``."""
        try:
            t = self._handle(name).get_tensor(name)
        except LowbitError:
            raise
        except Exception as e:         # a truncated or corrupt shard
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise LowbitError(f"cannot read tensor '{name}' from '{self.folder / self.files[name]}': {why}") from None
        return t if dtype is None else t.to(dtype)


def checkpoint_dtype(folder: Path) -> Optional[torch.dtype]:
    """The float dtype most of a safetensors checkpoint's values are stored in (bfloat16, float16 or float32), or
    None for a folder without safetensors weights."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    try:
        weights = CheckpointWeights(folder)
    except LowbitError:
        return None
    counts: dict = {}
    for name in weights.names():
        shape, dtype = weights.shape_dtype(name)
        if dtype in names:
            counts[names[dtype]] = counts.get(names[dtype], 0) + int(torch.Size(shape).numel())
    return max(counts, key=counts.get) if counts else None


def _source_name(name: str, available: set, tied: dict, prefix: str) -> str:
    """The checkpoint's name for the model's tensor ``name``: itself, the tensor it is tied to, or either with the
    base model's prefix added or removed (a checkpoint saved from the bare model or from a head model)."""
    for candidate in (name, tied.get(name)):
        if candidate is None:
            continue
        variants = [candidate]
        if prefix:
            stripped = candidate.startswith(prefix + ".")
            variants.append(candidate[len(prefix) + 1:] if stripped else f"{prefix}.{candidate}")
        for v in variants:
            if v in available:
                return v
    raise LowbitError(f"the checkpoint has no tensor for '{name}'; its weights do not match config.json (re-save "
                      "the model with save_pretrained())")


def bind(graph, weights: CheckpointWeights, model, dtype: torch.dtype = torch.float32,
         attrs: Optional[list[str]] = None) -> int:
    """Give the weightless ``graph`` (traced from ``model``, frontend/skeleton.py) the checkpoint's tensors in
    ``dtype``: every FakeTensor constant, or only those in ``attrs`` (a block's, for the streaming compile).
    Returns how many were bound."""
    from torch._subclasses.fake_tensor import FakeTensor

    from lowbit.ir.graph import ROOT_PREFIX

    gm = graph.gm
    targets = attrs if attrs is not None else sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    prefix, available = getattr(model, "base_model_prefix", "") or "", weights.names()
    bound = 0
    for target in targets:
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        current = getattr(owner, attr)
        if not isinstance(current, FakeTensor):
            continue
        name = target[len(ROOT_PREFIX):] if target.startswith(ROOT_PREFIX) else target
        value = weights.read(_source_name(name, available, tied, prefix), dtype)
        if tuple(value.shape) != tuple(current.shape):
            raise LowbitError(f"checkpoint tensor for '{name}' has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(current.shape)}; its weights do not match config.json")
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value
        bound += 1
    return bound
