"""Sibling matmuls -> one packed matmul + split.

Pattern: two or more quantized linears (``lowbit::wna16_linear`` or ``lowbit::w8a8_linear``) that read the
same input node, in the same format (op, bits, group size, K): Q/K/V, gate/up, in any architecture.
Replacement: one op of that format over the weights concatenated along N (the packed layout is row-major
per output channel, so codes, scales, zeros and biases concatenate as they are; a sibling without a bias
gets zeros), then ``split_with_sizes`` back into the siblings' outputs. Every output element is the same
dot product as before, so the check holds to float reassociation. The input is read, and for W8A8
quantized per token, once instead of once per sibling; decode launches one kernel instead of three.
Siblings in different formats (a recipe override giving V 8 bits and Q/K 4) are left alone, counted by
the field they differ in.
"""

from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx

from lowbit.rules import RuleResult, keep_meta

LINEAR_OPS = {torch.ops.lowbit.wna16_linear.default: "wna16", torch.ops.lowbit.w8a8_linear.default: "w8a8"}
_FORMAT_FIELDS = ("op", "bits", "group_size", "in_features")


def _format(node: fx.Node) -> tuple:
    return (LINEAR_OPS[node.target], node.args[5], node.args[6], node.args[7])


def _merged_name(names: list[str]) -> str:
    """'model.layers.0.self_attn.q_proj' + ... -> 'model.layers.0.self_attn.q_proj+k_proj+v_proj'."""
    prefix = os.path.commonprefix([n.rsplit(".", 1)[0] + "." if "." in n else "" for n in names])
    return prefix + "+".join(n[len(prefix):] for n in names)


class MergeSiblingMatmuls:
    name = "merge_sibling_matmuls"

    def apply(self, graph, nodes=None) -> "RuleResult":
        result = RuleResult()
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for n in graph.gm.graph.nodes if nodes is None else nodes:
            if n.op == "call_function" and n.target in LINEAR_OPS:
                by_input.setdefault(n.args[0], []).append(n)
        site_of = {s.node: s for s in graph.sites.values()}
        for x, nodes in by_input.items():
            if len(nodes) < 2:
                continue
            formats: dict[tuple, list[fx.Node]] = {}
            for n in nodes:
                formats.setdefault(_format(n), []).append(n)
            if len(formats) > 1:
                keys = list(formats)
                differ = [f for i, f in enumerate(_FORMAT_FIELDS) if len({k[i] for k in keys}) > 1]
                result.skip(f"siblings differ in {'/'.join(differ)}")
            for group in formats.values():
                if len(group) > 1:
                    names = [site_of[n].name if n in site_of else n.name for n in group]
                    self._merge(graph, x, group, [site_of.get(n) for n in group], _merged_name(names))
                    result.fired += 1
                    result.rewrites.append(_merged_name(names))
        return result

    @staticmethod
    def _merge(graph, x: fx.Node, nodes: list[fx.Node], sites: list, name: str):
        g = graph.gm.graph
        const = [[graph.attr(a.target) if isinstance(a, fx.Node) else None for a in n.args[1:5]] for n in nodes]
        sizes = [c[0].shape[0] for c in const]
        tensors = {key: torch.cat([c[i] for c in const]) for i, key in enumerate(("qweight", "scales", "zeros"))}
        if any(c[3] is not None for c in const):
            tensors["bias"] = torch.cat([c[3] if c[3] is not None else torch.zeros(n, dtype=graph.dtype)
                                         for c, n in zip(const, sizes)])
        first = nodes[0]
        with g.inserting_before(first):
            attrs = graph.register_tensors(name, tensors)
            merged = g.call_function(first.target, (x, attrs["qweight"], attrs["scales"], attrs["zeros"],
                                                    attrs.get("bias"), *first.args[5:8]))
            split = g.call_function(torch.ops.aten.split_with_sizes.default, (merged, sizes, -1))
            outs = [g.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
        keep_meta(merged, first)
        merged.meta["lowbit_name"] = name
        for n, out, site in zip(nodes, outs, sites):
            n.replace_all_uses_with(out)
            g.erase_node(n)
            if site is not None:
                site.node = out
