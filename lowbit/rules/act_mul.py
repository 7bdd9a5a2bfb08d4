"""Activation x up-projection -> one op; with W8A8 consumers, the following INT8 quantization too.

Pattern: ``act(gate) * up`` where ``gate`` and ``up`` are the two halves of one tensor (the merged gate/up
matmul's output split in two: ``split_with_sizes`` after the sibling rule, ``chunk`` where the checkpoint
stores them fused, Phi-3) and ``act`` is SiLU or GELU (exact or tanh). Replacement:
``lowbit::act_mul(y, act)``, which reads the merged output once and writes only the product; when every
reader of the product is a W8A8 matmul, ``lowbit::act_mul_quant_int8(y, act)`` feeding
``lowbit::w8a8_linear_codes`` instead, so the float product is never written. The same float operations in
the same order, so the rewrite is exact. Near-misses are counted: gate and up from separate matmuls (their
formats differ, so the sibling rule did not merge them), the activation on the second half.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lowbit.rules import RuleResult, feed_codes, keep_meta

aten = torch.ops.aten
W8A8 = torch.ops.lowbit.w8a8_linear.default


def _activation(n) -> str | None:
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return None
    if n.target == aten.silu.default:
        return "silu"
    if n.target == aten.gelu.default:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(n.kwargs.get("approximate", "none"))
    return None


def _half(n):
    """(source tensor, index) when ``n`` is half 0 or 1 of an even split of a tensor's last dimension."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target == operator.getitem):
        return None
    split, index = n.args
    if split.op != "call_function":
        return None
    if split.target == aten.split_with_sizes.default:
        sizes = list(split.args[1])
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        even = len(sizes) == 2 and sizes[0] == sizes[1]
    elif split.target == aten.chunk.default:
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        even = split.args[1] == 2
    else:
        return None
    val = split.args[0].meta.get("val")
    last = dim == -1 or (val is not None and dim == val.dim() - 1)
    return (split.args[0], index) if even and last else None


class ActMul:
    name = "act_mul"

    def apply(self, graph, nodes=None) -> RuleResult:
        result = RuleResult()
        g = graph.gm.graph
        site_of = {s.node: s for s in graph.sites.values()}
        for m in list(g.nodes if nodes is None else nodes):
            if not (m.op == "call_function" and m.target == aten.mul.Tensor and len(m.args) == 2):
                continue
            a, b = m.args
            act_node, up = (a, b) if _activation(a) else (b, a)
            act = _activation(act_node)
            if act is None or len(act_node.users) != 1:
                continue
            gate, other = _half(act_node.args[0]), _half(up)
            if gate is None or other is None or gate[0] is not other[0]:
                result.skip("gate and up are separate tensors (not one merged matmul's halves)")
                continue
            if (gate[1], other[1]) != (0, 1):
                result.skip("the activation is on the second half")
                continue
            y = gate[0]
            quantize = bool(m.users) and all(u.op == "call_function" and u.target == W8A8 and u.args[0] is m
                                            for u in m.users)
            with g.inserting_before(m):
                if quantize:
                    fused = g.call_function(torch.ops.lowbit.act_mul_quant_int8.default, (y, act))
                    codes = g.call_function(operator.getitem, (fused, 0))
                    scales = g.call_function(operator.getitem, (fused, 1))
                else:
                    fused = g.call_function(torch.ops.lowbit.act_mul.default, (y, act))
            keep_meta(fused, m)
            if quantize:
                feed_codes(graph, m, codes, scales, site_of)
            else:
                m.replace_all_uses_with(fused)
            g.erase_node(m)
            g.erase_node(act_node)
            result.fired += 1
            result.rewrites.append(f"{act} x up" + (" + int8 quantize" if quantize else ""))
        return result
