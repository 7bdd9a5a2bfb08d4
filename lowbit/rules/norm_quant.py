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

import torch
import torch.fx as fx

from lowbit.ir.patterns import call, last_dim_view, layernorm_parts, rmsnorm_parts
from lowbit.rules import RuleResult, feed_codes, keep_meta

W8A8 = torch.ops.lowbit.w8a8_linear.default


class NormQuantInt8:
    name = "norm_quant_int8"

    def apply(self, graph, nodes=None) -> RuleResult:
        result = RuleResult()
        inputs = {}
        for n in graph.gm.graph.nodes if nodes is None else nodes:
            if call(n, W8A8) and isinstance(n.args[0], fx.Node):
                inputs.setdefault(n.args[0], None)
        site_of = {s.node: s for s in graph.sites.values()}
        for x in inputs:
            # A reshape that keeps the last dimension (GPT-2's Conv1D flattens tokens) commutes with the norm.
            view = x if last_dim_view(x) else None
            norm_out = view.args[0] if view is not None else x
            rms, why = rmsnorm_parts(norm_out)
            ln = None if rms else layernorm_parts(norm_out)
            if rms is None and ln is None:
                if why:
                    result.skip(why)
                continue
            if not all(call(u, W8A8) and u.args[0] is x for u in x.users):
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
