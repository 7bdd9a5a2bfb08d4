"""Residual add -> the epilogue of the quantized matmul that produces one of its operands.

Pattern: ``residual + linear(x)`` (either order, or Falcon's ``linear(x) += residual``; through an
inference-mode dropout) where ``linear`` is a quantized matmul op (``wna16_linear``, ``w8a8_linear``,
``w8a8_linear_codes``) whose output only this add reads, and the add does not broadcast (both operands shaped
like its result, one dtype). Replacement: the same op with ``residual=`` (its kernels add it to the tile before
the one store), so the matmul's output is not written and read back for the add. The same float operations,
so the rewrite is exact up to the order of the sum. Near-misses are counted: a matmul output that something
else also reads, one that is reshaped before the add (GPT-2's Conv1D), a broadcasting add (a separate bias).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lowbit.rules import RuleResult, keep_meta

aten = torch.ops.aten
L = torch.ops.lowbit
LINEARS = (L.wna16_linear.default, L.w8a8_linear.default, L.w8a8_linear_codes.default)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _linear(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in LINEARS


def _matmul_of(n):
    """(the matmul, the nodes from it to the add) when ``n`` is a quantized matmul's output, directly or through
    ``dropout(train=False)`` (an identity that inference graphs keep), else None."""
    if _linear(n):
        return n, [n]
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.dropout.default
            and len(n.args) == 3 and n.args[2] is False and _linear(n.args[0]) and len(n.args[0].users) == 1):
        return n.args[0], [n, n.args[0]]
    return None


def _shape(n) -> tuple | None:
    """(shape as text, dtype) from the traced meta value; text so symbolic sizes compare without guards."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return None if not isinstance(v, torch.Tensor) else (tuple(str(d) for d in v.shape), v.dtype)


class ResidualAdd:
    name = "residual_add"

    def apply(self, graph, nodes=None) -> RuleResult:
        result = RuleResult()
        g = graph.gm.graph
        site_of = {s.node: s for s in graph.sites.values()}
        for add in list(g.nodes if nodes is None else nodes):
            if not (add.op == "call_function" and add.target in (aten.add.Tensor, aten.add_.Tensor)
                    and len(add.args) == 2 and not add.kwargs):
                continue
            # A matmul operand free for the epilogue (GPT-NeoX's parallel block adds two matmuls' outputs). An
            # in-place add (Falcon's ``mlp_output += attention_output``) only into the matmul's own output.
            orders = (add.args, add.args[::-1]) if add.target == aten.add.Tensor else (add.args,)
            candidates = [(_matmul_of(a), b) for a, b in orders]
            candidates = [(m, b) for m, b in candidates if m is not None and m[0].kwargs.get("residual") is None]
            if not candidates:
                if any(isinstance(a, fx.Node) and a.target in RESHAPES and _linear(a.args[0]) for a in add.args):
                    result.skip("the matmul's output is reshaped before the add")
                continue
            (lin, chain), res = candidates[0]
            if len(chain[0].users) != 1:
                result.skip("the matmul's output is also read by another op")
                continue
            out = _shape(add)
            if out is None or _shape(chain[0]) != out or _shape(res) != out:
                result.skip("the add broadcasts or changes dtype")
                continue
            with g.inserting_before(add):
                fused = g.call_function(lin.target, lin.args, {**lin.kwargs, "residual": res})
            keep_meta(fused, lin)
            fused.meta["val"] = add.meta["val"]
            add.replace_all_uses_with(fused)
            for n in [add, *chain]:
                g.erase_node(n)
            site = site_of.get(lin)
            if site is not None:
                site.node = fused
            result.fired += 1
            result.rewrites.append((site.name.rsplit(".", 1)[-1] if site else "matmul") + " + residual")
        return result
