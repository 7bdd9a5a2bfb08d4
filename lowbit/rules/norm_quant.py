"""Norm -> per-token INT8 quantization -> one op, for W8A8 consumers.

Pattern: an RMSNorm (transformers' ``x.float() * rsqrt(mean(x², -1) + eps)``, cast back, times a constant
weight, or Gemma's ``1 + w`` of one, folded into a new constant) or an ``aten.layer_norm`` whose output only
W8A8 matmuls (``lowbit::w8a8_linear``) read.
Replacement: ``lowbit::rmsnorm_quant_int8`` / ``lowbit::layernorm_quant_int8`` (normalized and quantized
per token in one pass, the float row never written) feeding ``lowbit::w8a8_linear_codes`` for each consumer.
The norm computes the same float operations and each consumer quantized the same row the same way, so the
rewrite is exact in float32 (Gemma's product rounds once after the multiply, the fused op rounds the normalized
row to x's dtype first: the two differ in half precision by a rounding). Near-misses are counted: a norm output
that a float op also reads, a norm whose weight is computed otherwise.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from lowbit.ir.graph import module_of
from lowbit.rules import RuleResult, feed_codes, keep_meta

aten = torch.ops.aten
W8A8 = torch.ops.lowbit.w8a8_linear.default
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _skip_casts(n):
    while _call(n, *_CASTS):
        n = n.args[0]
    return n


def _same_dtype_cast(n) -> bool:
    """A cast to the dtype its input already has (Gemma's ``type_as`` in a float32 graph)."""
    if not _call(n, *_CASTS, aten.type_as.default) or not isinstance(n.args[0], fx.Node):
        return False
    a, b = n.meta.get("val"), n.args[0].meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _normalized(n) -> Optional[tuple]:
    """(x, eps) when ``n`` (casts skipped) is ``x * rsqrt(mean(x², -1, keepdim) + eps)``."""
    h = _skip_casts(n)
    if not _call(h, aten.mul.Tensor):
        return None
    x, r = h.args if _call(h.args[1], aten.rsqrt.default) else h.args[::-1]
    if not _call(r, aten.rsqrt.default) or not _call(r.args[0], aten.add.Tensor):
        return None
    mean, eps = r.args[0].args
    if not _call(mean, aten.mean.dim) or list(mean.args[1]) != [-1] or not (mean.args[2:] or [False])[0]:
        return None
    sq = mean.args[0]
    if not (_call(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x and sq.args[1] == 2 and isinstance(eps, float)):
        return None
    return x, eps


def _weight(w) -> Optional[tuple]:
    """(constant get_attr node, offset or None) for the norm's weight: a constant as it is, or Gemma's ``1 + w``
    (or ``w + 1``) of one, which the rewrite folds into a new constant; else None."""
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return w, None
    if not _call(w, aten.add.Tensor):
        return None
    a, b = w.args
    const, offset = (a, b) if isinstance(b, (int, float)) else (b, a)
    const = _skip_casts(const)
    if not (isinstance(offset, (int, float)) and isinstance(const, fx.Node) and const.op == "get_attr"):
        return None
    return const, offset


def _rmsnorm(graph, out: fx.Node) -> tuple[Optional[tuple], Optional[str]]:
    """((input, (weight node, offset), eps, module path), None) when ``out`` is an RMSNorm's output, else (None, why
    not or None)."""
    while _same_dtype_cast(out):
        out = out.args[0]
    if not _call(out, aten.mul.Tensor):
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
    return (_skip_casts(x), weight, eps, module_of(out)[0]), None


def _layernorm(out: fx.Node) -> Optional[tuple]:
    if not _call(out, aten.layer_norm.default) or len(out.args[1]) != 1:
        return None
    args = list(out.args) + [None] * (5 - len(out.args))
    return args[0], args[2], args[3], (args[4] if args[4] is not None else 1e-5)


class NormQuantInt8:
    name = "norm_quant_int8"

    def apply(self, graph, nodes=None) -> RuleResult:
        result = RuleResult()
        inputs = {}
        for n in graph.gm.graph.nodes if nodes is None else nodes:
            if _call(n, W8A8) and isinstance(n.args[0], fx.Node):
                inputs.setdefault(n.args[0], None)
        site_of = {s.node: s for s in graph.sites.values()}
        for x in inputs:
            # A reshape that keeps the last dimension (GPT-2's Conv1D flattens tokens) commutes with the norm.
            view = x if _call(x, *_VIEWS) and x.args[1][-1] in (-1, x.args[0].meta.get("val", x).shape[-1]) \
                and len(x.args[0].users) == 1 else None
            norm_out = view.args[0] if view is not None else x
            rms, why = _rmsnorm(graph, norm_out)
            ln = None if rms else _layernorm(norm_out)
            if rms is None and ln is None:
                if why:
                    result.skip(why)
                continue
            if not all(_call(u, W8A8) and u.args[0] is x for u in x.users):
                result.skip("the norm's output is also read by a float op")
                continue
            names = ", ".join(site_of[u].name if u in site_of else u.meta.get("lowbit_name", u.name) for u in x.users)
            self._rewrite(graph, x, view, rms, ln, site_of)
            result.fired += 1
            result.rewrites.append(("rmsnorm" if rms else "layernorm") + " -> " + names)
        return result

    @staticmethod
    def _rewrite(graph, x: fx.Node, view, rms, ln, site_of):
        g = graph.gm.graph
        if rms is not None:
            x_in, (weight, offset), eps, path = rms
            if offset is not None:
                folded = graph.attr(weight.target).detach().float() + offset
                with g.inserting_before(x):
                    weight = graph.register_tensors(path or weight.target, {"norm_weight": folded})["norm_weight"]
            args = [x_in, weight, eps]
        else:
            args = list(ln)
        with g.inserting_after(x):
            if view is not None:
                args[0] = g.call_function(view.target, (args[0], *view.args[1:]), dict(view.kwargs))
        with g.inserting_after(args[0] if view is not None else x):
            op = torch.ops.lowbit.rmsnorm_quant_int8 if rms is not None else torch.ops.lowbit.layernorm_quant_int8
            fused = g.call_function(op.default, tuple(args))
        with g.inserting_after(fused):
            codes = g.call_function(operator.getitem, (fused, 0))
        with g.inserting_after(codes):
            scales = g.call_function(operator.getitem, (codes.args[0], 1))
        keep_meta(fused, x)
        feed_codes(graph, x, codes, scales, site_of)
