"""Where one step of the torch backend spends its time, by layer and by op kind (``lowbit profile --per-layer``).

The shipped program is copied with each run of consecutive nodes of one (layer, kind) wrapped in a
``torch.profiler`` range, so ``torch.profiler`` measures the runs as they execute, ops and dispatch included.
Layers are read from the weights a node reads: nodes after one that reads a ``layers.<i>`` tensor belong to block
i, those before the first block to ``embed`` (the embedding and the rotary tables), those after the last block
that read another weight to ``head`` (final norm, lm_head). Kinds:

- ``quantized matmul``: lowbit's quantized linear ops (and the CPU kernels' modules that replace them);
- ``float matmul``: ``linear`` / ``mm`` / ``addmm`` / ``matmul`` / ``bmm`` on float weights;
- ``attention``: the attention op and, inside a block, what runs between the first projection and it (rotary
  embedding, the KV cache concat, head reshapes);
- ``norm``: layer / RMS norms (their statistics, the scaling by the weight);
- ``other``: the rest (residual adds, activations, casts).
"""

from __future__ import annotations

import copy
import operator
import re
from collections import defaultdict

import torch
import torch.fx as fx

aten = torch.ops.aten
KINDS = ("quantized matmul", "float matmul", "attention", "norm", "other")
FLOAT_MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default}
NORM_OPS = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default, aten.layer_norm.default,
            aten.native_layer_norm.default, aten.var_mean.correction}
# Ops that only move, view or cast data: they join the run of the node before them.
PASSIVE = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.unsqueeze.default, aten.to.dtype,
           aten.to.dtype_layout, aten.to.device, aten.contiguous.default, aten.permute.default, aten.expand.default,
           aten.squeeze.dim, aten.slice.Tensor, aten.detach_.default, aten.lift_fresh_copy.default,
           aten._assert_tensor_metadata.default, aten.sym_size.int}
BLOCK = re.compile(r"(?:^|_)(?:layers?|h|blocks?)_(\d+)_")


def _is_quantized_matmul(node) -> bool:
    if node.op == "call_module":
        return True
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "lowbit" and "linear" in t._opname


def _is_attention(node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    return (t.namespace == "lowbit" and t._opname == "attention") or t._opname in (
        "scaled_dot_product_attention", "_softmax", "softmax")


def _weights(node) -> list[str]:
    return [a.target for a in node.all_input_nodes if a.op == "get_attr"]


def classify(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str]]:
    """(node, layer, kind) of every call node, in graph order (see the module docstring)."""
    out, norm_values = [], set()
    label, kind, in_attention, attention_done = "embed", "other", False, False
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        weights = _weights(node)
        blocks = [int(m.group(1)) for w in weights for m in [BLOCK.search(w)] if m]
        if blocks and f"block {blocks[0]}" != label:
            label, in_attention, attention_done = f"block {blocks[0]}", False, False
        elif weights and not blocks and label.startswith("block") and not all("lifted" in w for w in weights):
            label = "head"
        if _is_quantized_matmul(node):
            kind = "quantized matmul"
            # A block's first projection (Q/K/V) opens its attention region.
            in_attention = in_attention or (label.startswith("block") and not attention_done)
        elif node.target in FLOAT_MATMULS:
            kind = "float matmul"
        elif _is_attention(node):
            kind, in_attention, attention_done = "attention", False, True
        elif node.target in NORM_OPS or (node.target in (aten.mul.Tensor, aten.add.Tensor) and any(
                a in norm_values for a in node.all_input_nodes)):
            kind = "norm"
        elif in_attention:
            kind = "attention"
        elif node.target not in PASSIVE and node.target is not operator.getitem:
            kind = "other"
        if kind == "norm":
            norm_values.add(node)
        if out and out[-1][1] != label:
            # A norm reads its weight last: the statistics before it belong to the layer that weight opens.
            i, previous = len(out) - 1, out[-1][1]
            while i >= 0 and out[i][2] == "norm" and out[i][1] == previous:
                out[i] = (out[i][0], label, "norm")
                i -= 1
        out.append((node, label, kind))
    return out


def instrumented(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """A copy of ``gm`` (sharing its tensors and modules) whose runs of one (layer, kind) are profiler ranges named
    ``"<layer>|<kind>"``; and the (layer, kind) of each range."""
    graph = copy.deepcopy(gm.graph)
    runs: list[list] = []
    for node, label, kind in classify(fx.GraphModule(gm, graph)):
        if runs and runs[-1][0] == (label, kind) and runs[-1][2].next is node:
            runs[-1][2] = node
        else:
            runs.append([(label, kind), node, node])
    enter, leave = torch.ops.profiler._record_function_enter_new.default, \
        torch.ops.profiler._record_function_exit._RecordFunction
    for (label, kind), first, last in runs:
        with graph.inserting_before(first):
            handle = graph.call_function(enter, (f"{label}|{kind}", None))
        with graph.inserting_after(last):
            graph.call_function(leave, (handle,))
    return fx.GraphModule(gm, graph), [key for key, _, _ in runs]


def times_ms(events) -> dict[tuple[str, str], float]:
    """Total CPU milliseconds per (layer, kind) over the profiler ``events`` of our ranges."""
    total: dict = defaultdict(float)
    for e in events:
        if "|" in e.name and e.name.split("|", 1)[1] in KINDS:
            label, kind = e.name.split("|", 1)
            total[(label, kind)] += e.cpu_time_total / 1e3
    return dict(total)
