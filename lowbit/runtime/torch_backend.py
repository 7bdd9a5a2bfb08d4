"""Torch backend: rebuild the transformers model from an artifact, quantized layers as lowbit ops.

The architecture comes from the artifact's config.json (transformers' own modeling code gives attention,
KV cache and position handling); every layer in graph.json becomes a ``QuantLinear`` whose forward is
the layer's ``lowbit::`` op, so the packed weights are what runs, never a float copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.compiler.frontend import build_empty, quiet_transformers
from lowbit.compiler.lower_torch import GRAPH_FILE, WEIGHTS_FILE
from lowbit.errors import LowbitError
from lowbit.plugins import ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.passes.quantize import packed_cols, num_groups


LINEAR_OPS = ("wna16_linear", "w8a8_linear")


class QuantLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with W held packed (lowbit layout), applied by ``lowbit::wna16_linear`` (float
    activations) or ``lowbit::w8a8_linear`` (per-token INT8 activations)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, has_bias: bool,
                 op: str = "wna16_linear"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.op = bits, group_size, op
        self._op = getattr(torch.ops.lowbit, op)
        g = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.empty(out_features, packed_cols(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, g, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(out_features, g, dtype=torch.uint8))
        self.register_buffer("bias", torch.empty(out_features) if has_bias else None)

    def forward(self, x):
        return self._op(x, self.qweight, self.scales, self.zeros, self.bias,
                                             self.bits, self.group_size, self.in_features)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
                + (", int8 activations" if self.op == "w8a8_linear" else ""))


class QuantEmbedding(torch.nn.Module):
    """Token embedding with its table held packed; ``lowbit::wna16_embedding`` dequantizes the looked-up rows."""

    def __init__(self, num_embeddings: int, dim: int, bits: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        g = num_groups(dim, group_size)
        self.register_buffer("qweight", torch.empty(num_embeddings, packed_cols(dim, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(num_embeddings, g, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(num_embeddings, g, dtype=torch.uint8))

    def forward(self, ids):
        return torch.ops.lowbit.wna16_embedding(ids, self.qweight, self.scales, self.zeros, self.bits,
                                                self.group_size, self.embedding_dim, self.dtype)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}"


def quant_module(name: str, spec: dict, dtype: torch.dtype, path: Path) -> torch.nn.Module:
    """The runtime module for one graph.json layer entry."""
    if spec["op"] in LINEAR_OPS:
        return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                           spec["has_bias"], op=spec["op"])
    if spec["op"] == "wna16_embedding":
        return QuantEmbedding(spec["out_features"], spec["in_features"], spec["bits"], spec["group_size"], dtype)
    raise LowbitError(f"artifact '{path}': layer {name} uses op {spec['op']}, unknown to this lowbit; upgrade lowbit")


def swap_module(model: torch.nn.Module, name: str, module: torch.nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig

    quiet_transformers()
    config = AutoConfig.from_pretrained(path)
    layers = json.loads((path / GRAPH_FILE).read_text())["layers"]
    model = build_empty(config, dtype=dtype)
    for name, spec in layers.items():
        swap_module(model, name, quant_module(name, spec, dtype, path))
    tensors = load_file(str(path / WEIGHTS_FILE))
    # Float weights in the runtime dtype; packed codes/scales/zeros exactly as stored.
    tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v)
               for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise LowbitError(f"artifact '{path}': weights file has tensors the model does not: {unexpected[:3]}")
    shared = _tied_names(model)
    really_missing = [k for k in missing if k not in shared]
    if really_missing:
        raise LowbitError(f"artifact '{path}': weights file lacks {really_missing[:3]}; recompile it")
    return model.eval()


def _tied_names(model) -> set:
    """Parameter names that share storage with another parameter (restored by tying, not loading)."""
    by_ptr: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}
