"""Patterns of the traced graph that several rewrites look for: casts, RMSNorm and LayerNorm outputs and their
constant weights. A match returns the nodes; what to do with them is the caller's (rules/norm_quant.py fuses the
norm with its consumers' quantization, passes/awq.py folds scales into its weight)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from lowbit.ir.graph import module_of

aten = torch.ops.aten
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def skip_casts(n):
    while call(n, *CASTS):
        n = n.args[0]
    return n


def _same_dtype_cast(n) -> bool:
    """A cast to the dtype its input already has (Gemma's ``type_as`` in a float32 graph)."""
    if not call(n, *CASTS, aten.type_as.default) or not isinstance(n.args[0], fx.Node):
        return False
    a, b = n.meta.get("val"), n.args[0].meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _normalized(n) -> Optional[tuple]:
    """(x, eps) when ``n`` (casts skipped) is ``x * rsqrt(mean(x², -1, keepdim) + eps)``."""
    h = skip_casts(n)
    if not call(h, aten.mul.Tensor):
        return None
    x, r = h.args if call(h.args[1], aten.rsqrt.default) else h.args[::-1]
    if not call(r, aten.rsqrt.default) or not call(r.args[0], aten.add.Tensor):
        return None
    mean, eps = r.args[0].args
    if not call(mean, aten.mean.dim) or list(mean.args[1]) != [-1] or not (mean.args[2:] or [False])[0]:
        return None
    sq = mean.args[0]
    if not (call(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x and sq.args[1] == 2 and isinstance(eps, float)):
        return None
    return x, eps


def _weight(w) -> Optional[tuple]:
    """(constant get_attr node, offset or None) for the norm's weight: a constant as it is, or Gemma's ``1 + w``
    (or ``w + 1``) of one; else None."""
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return w, None
    if not call(w, aten.add.Tensor):
        return None
    a, b = w.args
    const, offset = (a, b) if isinstance(b, (int, float)) else (b, a)
    const = skip_casts(const)
    if not (isinstance(offset, (int, float)) and isinstance(const, fx.Node) and const.op == "get_attr"):
        return None
    return const, offset


def rmsnorm_parts(out: fx.Node) -> tuple[Optional[tuple], Optional[str]]:
    """((input, (weight node, offset), eps, module path), None) when ``out`` is an RMSNorm's output (transformers'
    ``x.float() * rsqrt(mean(x², -1) + eps)``, cast back, times a constant weight or Gemma's ``1 + w`` of one), else
    (None, why not or None)."""
    while _same_dtype_cast(out):
        out = out.args[0]
    if not call(out, aten.mul.Tensor):
        return None, None
    a, b = out.args
    weight, h = (a, b) if _normalized(b) else (b, a)
    found = _normalized(h)
    if found is None:
        return None, None
    x, eps = found
    weight = _weight(weight)
    if weight is None:
        return None, "the norm's weight is computed, not a constant"
    return (skip_casts(x), weight, eps, module_of(out)[0]), None


def layernorm_parts(out: fx.Node) -> Optional[tuple]:
    """(input, weight, bias, eps) of an ``aten.layer_norm`` over the last dimension, else None."""
    if not call(out, aten.layer_norm.default) or len(out.args[1]) != 1:
        return None
    args = list(out.args) + [None] * (5 - len(out.args))
    return args[0], args[2], args[3], (args[4] if args[4] is not None else 1e-5)


def last_dim_view(x: fx.Node) -> bool:
    """Whether ``x`` is a reshape that keeps the last dimension of its only reader's input (GPT-2's Conv1D flattens
    tokens), which commutes with a norm over that dimension."""
    return (call(x, *VIEWS) and x.args[1][-1] in (-1, x.args[0].meta.get("val", x).shape[-1])
            and len(x.args[0].users) == 1)


def norm_output(x: fx.Node) -> fx.Node:
    """The node a norm would have made ``x`` from: ``x``, or what a last-dimension-keeping view reshaped."""
    return x.args[0] if last_dim_view(x) else x


def constant_uses(graph: fx.Graph) -> dict[str, int]:
    """How many ops read each constant (by ``get_attr`` target; shape assertions aside)."""
    uses: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            readers = [u for u in n.users if not call(u, aten._assert_tensor_metadata.default)]
            uses[n.target] = uses.get(n.target, 0) + len(readers)
    return uses


def attention_values(x: fx.Node, made_by: dict, uses: dict) -> Optional[tuple]:
    """(value projection site, channel map) when ``x`` is attention's output [.., heads, head_dim] reshaped for the
    output projection and its values are a projection's output only viewed as heads and transposed (after the
    past values, a cache only this attention reads); ``made_by``: matmul sites by output node, ``uses``: readers of
    each constant. Output channel h * D + d reads value channel (h // kv_groups) * D + d (grouped-query heads
    share a value head)."""
    att = x.args[0] if call(x, *VIEWS) else None
    if not (call(att, torch.ops.lowbit.attention.default) and len(att.users) == 1):
        return None
    heads, dim = (int(d) for d in att.meta["val"].shape[-2:])
    groups, v = int(att.args[5]), att.args[2]
    if call(v, torch.ops.aten.cat.default):
        parts = v.args[0]
        if len(parts) != 2 or parts[0].op != "placeholder":
            return None
        v = parts[1]
    if not (call(v, torch.ops.aten.transpose.int) and sorted(v.args[1:3]) == [1, 2] and len(v.users) == 1):
        return None
    view = v.args[0]
    site = made_by.get(view.args[0]) if call(view, *VIEWS) and len(view.users) == 1 else None
    if (site is None or len(site.node.users) != 1 or uses.get(site.weight_attr) != 1
            or (site.bias_attr is not None and uses.get(site.bias_attr) != 1)
            or site.out_features != heads // groups * dim or heads % groups):
        return None
    channel = torch.tensor([(h // groups) * dim + d for h in range(heads) for d in range(dim)])
    return site, channel
