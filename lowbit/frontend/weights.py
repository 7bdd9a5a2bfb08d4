"""A model folder's weights, one tensor at a time: ``model.safetensors``, or the shards a
``model.safetensors.index.json`` lists, each tensor read in its stored dtype when asked for. What the
streaming compile binds to a weightless trace (frontend/skeleton.py) block by block, instead of loading the model.

The folder is untrusted input: the index must be a JSON object mapping tensor names to plain file names in the
folder (no paths, no links out of it), every listed file must exist, and a name the checkpoint lacks is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lowbit.device import dtype_name
from lowbit.errors import LowbitError
from lowbit.format.safetensors_file import DTYPES, read_header, read_tensor
from lowbit.frontend.skeleton import drop_weights, set_parameter

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _shard_map(folder: Path) -> dict[str, str]:
    """{tensor name: file name} of the folder's checkpoint, every file checked to be a plain file inside it."""
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
        weight_map = {name: SINGLE for name in read_header(folder / SINGLE)}
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
    """Read-only access to a checkpoint's tensors by name; each ``read`` reads one tensor from its shard into
    memory of its own (no memory map: the resident set holds what the caller keeps, not what it has read).
    ``precision`` (the compile's ``--dtype``): float tensors are read as if the checkpoint held them in it."""

    def __init__(self, folder: Path, precision: Optional[torch.dtype] = None):
        self.folder = Path(folder)
        self.files = _shard_map(self.folder)
        self.precision = precision
        self._headers: dict[str, dict] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def model_names(self, model) -> Optional[dict[str, str]]:
        """{the model's name for a tensor: the checkpoint's name}, through the key renames transformers applies
        when it loads this model class (GPT-NeoX's ``embed_out`` is ``lm_head``); None when loading it converts
        tensors (merges, splits), which only transformers' own loader does."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming
            transforms = get_model_conversion_mapping(model)
        except ImportError:
            return {name: name for name in self.files}
        out = {}
        for key in self.files:
            name = key
            for t in transforms:
                renamed, matched = t.rename_source_key(name)
                if matched is None:
                    continue
                if type(t) is not WeightRenaming:
                    return None
                name = renamed
            out[name] = key
        return out

    def _entry(self, name: str):
        if name not in self.files:
            raise LowbitError(f"the checkpoint in '{self.folder}' has no tensor '{name}'; its weights do not match "
                              "config.json (re-save the model with save_pretrained())")
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = read_header(self.folder / file)
        entry = self._headers[file].get(name)
        if entry is None:
            raise LowbitError(f"'{self.folder / file}' has no tensor '{name}', which {INDEX} places there; re-save "
                              "the model with save_pretrained()")
        return entry

    def shape_dtype(self, name: str) -> tuple[tuple, str]:
        """(shape, safetensors dtype name) of ``name`` without reading it."""
        entry = self._entry(name)
        return entry.shape, entry.dtype

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype (or ``precision``), or converted to ``dtype``."""
        entry = self._entry(name)
        stored = DTYPES[entry.dtype]
        if self.precision is not None and stored.is_floating_point and stored != self.precision:
            value = in_precision(self._read(name, entry, None), self.precision, name)
            return value if dtype is None else value.to(dtype)
        return self._read(name, entry, dtype)

    def _read(self, name: str, entry, dtype: Optional[torch.dtype]) -> torch.Tensor:
        try:
            with open(self.folder / self.files[name], "rb") as f:
                return read_tensor(f, entry, dtype)
        except OSError as e:
            raise LowbitError(f"cannot read tensor '{name}' from '{self.folder / self.files[name]}': {e.strerror}"
                              ) from None


def in_precision(t: torch.Tensor, precision: torch.dtype, name: str) -> torch.Tensor:
    """``t`` rounded to ``precision`` (in that dtype); a finite value it cannot hold (float16 past 65504) is
    refused, naming the weight, rather than stored as Inf."""
    out = t.to(precision)
    if not torch.isfinite(out).all() and torch.isfinite(t).all():
        biggest = float(t.abs().max())
        raise LowbitError(f"model weight {name} holds {biggest:.4g}, beyond {dtype_name(precision)}'s range; compile "
                          "with --dtype bfloat16 or float32")
    return out


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


class _CheckpointNames:
    """The checkpoint's name for a tensor of the weightless ``model``: through transformers' key renames, ties and
    the base-model prefix."""

    def __init__(self, weights: CheckpointWeights, model):
        self.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self.renamed = weights.model_names(model)
        if self.renamed is None:
            raise LowbitError(f"loading '{weights.folder}' converts tensors (transformers' weight conversion for "
                              f"{type(model).__name__}), which a weightless trace cannot read one at a time")
        self.prefix, self.available = getattr(model, "base_model_prefix", "") or "", set(self.renamed)

    def __call__(self, name: str) -> str:
        return self.renamed[_source_name(name, self.available, self.tied, self.prefix)]


def read_checked(weights: CheckpointWeights, name: str, shape: tuple, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Checkpoint tensor ``name``, which the model expects of ``shape``, converted to ``dtype`` when it is a float
    (None: as stored); a shape mismatch or a NaN / Inf is one line."""
    from lowbit.frontend.load import _finite, _non_finite_counts

    stored_shape, stored = weights.shape_dtype(name)
    if tuple(stored_shape) != tuple(shape):
        raise LowbitError(f"checkpoint tensor '{name}' has shape {tuple(stored_shape)}, the model expects "
                          f"{tuple(shape)}; its weights do not match config.json")
    value = weights.read(name, dtype if DTYPES[stored].is_floating_point else None)
    if value.is_floating_point() and not _finite(value):
        raise LowbitError(f"model weight {name} holds {_non_finite_counts(value)}; the checkpoint is corrupted "
                          "(re-download or re-convert it)")
    return value


class CheckpointSource:
    """A weightless graph's constants read from the checkpoint (``Graph.source``): each FakeTensor constant of the
    graph traced from ``model`` (frontend/skeleton.py) maps to the checkpoint tensor of its name (or the tensor it
    is tied to), read in the constant's traced dtype, or as stored; shapes are checked and NaN / Inf refused."""

    def __init__(self, graph, weights: CheckpointWeights, model):
        from torch._subclasses.fake_tensor import FakeTensor

        from lowbit.ir.graph import ROOT_PREFIX

        checkpoint_name = _CheckpointNames(weights, model)
        self.weights = weights
        self.names: dict[str, str] = {}            # attribute -> checkpoint name
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for target in graph.constants():
            t = graph.attr_value(target)
            if isinstance(t, FakeTensor):
                self.names[target] = checkpoint_name(target[len(ROOT_PREFIX):] if target.startswith(ROOT_PREFIX)
                                                     else target)
                self.shapes[target], self.dtypes[target] = tuple(t.shape), t.dtype

    def read(self, target: str, stored: bool = False) -> torch.Tensor:
        """The constant ``target`` in the traced dtype, or with ``stored`` in the checkpoint's dtype."""
        return read_checked(self.weights, self.names[target], self.shapes[target],
                            None if stored else self.dtypes[target])


class ModuleWeights:
    """Parameters of the weightless ``model`` made real from the checkpoint (``load``) and weightless again
    (``drop``): what a pass that runs the transformers modules themselves (LKD) holds, one block at a time."""

    def __init__(self, model, weights: CheckpointWeights):
        self.model, self.weights = model, weights
        self.checkpoint_name = _CheckpointNames(weights, model)

    def under(self, path: str) -> list[str]:
        """The names of the parameters of module ``path``."""
        return [n for n, _ in self.model.named_parameters() if n.startswith(path + ".")]

    def before(self, path: str) -> list[str]:
        """The names of the parameters the model registers before module ``path``'s (the embeddings, before the
        first block), which are all a forward up to that module reads."""
        names = []
        for n, _ in self.model.named_parameters():
            if n.startswith(path + "."):
                return names
            names.append(n)
        raise LowbitError(f"the model has no parameters under '{path}'")

    def load(self, names: list[str]) -> None:
        params = dict(self.model.named_parameters())
        for name in names:
            p = params[name]
            set_parameter(self.model, name, read_checked(self.weights, self.checkpoint_name(name), tuple(p.shape),
                                                         p.dtype))

    def drop(self, names: list[str]) -> None:
        drop_weights(self.model, set(names))


def bind(graph, weights: CheckpointWeights, model, attrs: Optional[list[str]] = None) -> int:
    """Give the weightless ``graph`` (traced from ``model``) the checkpoint's tensors: every FakeTensor constant,
    or only those in ``attrs``. Returns how many were bound."""
    source = CheckpointSource(graph, weights, model)
    targets = [t for t in (attrs if attrs is not None else source.names) if t in source.names]
    for target in targets:
        graph.set_constant(target, source.read(target))
    return len(targets)
