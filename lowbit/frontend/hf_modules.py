"""The transformers model with its quantized layers as lowbit modules: the module-level view of a quantized
graph, for passes that work on transformers' blocks (LKD swaps its students in with ``swap_module``) and as
the transformers-side reference of tests and ``bench/runtime_decode.py``.

Every quantized layer becomes a ``QuantLinear`` / ``QuantEmbedding`` whose forward is the layer's ``lowbit::``
op on the packed tensors, so the model computes what the shipped program computes.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit import ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.format.quantize import packed_cols, num_groups


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


def quant_module(name: str, spec: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The runtime module for one graph.json layer entry."""
    if spec["op"] in LINEAR_OPS:
        return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                           spec["has_bias"], op=spec["op"])
    if spec["op"] == "wna16_embedding":
        return QuantEmbedding(spec["out_features"], spec["in_features"], spec["bits"], spec["group_size"], dtype)
    raise LowbitError(f"layer {name} uses op {spec['op']}, which has no module form")


def swap_module(model: torch.nn.Module, name: str, module: torch.nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_modules(model: torch.nn.Module, graph) -> torch.nn.Module:
    """Swap every quantized layer of ``graph`` into ``model`` (in place) as its lowbit module."""
    dtype = next(model.parameters()).dtype
    for name, q in graph.quantized.items():
        mod = quant_module(name, q.layout(), dtype)
        for key, t in q.tensors().items():
            setattr(mod, key, t.detach())
        swap_module(model, name, mod)
    return model.eval()
