"""Where one step spends its time, by layer and by op kind (``lowbit profile --per-layer``).

Torch backend: the shipped program is copied with each run of consecutive nodes of one (layer, kind) wrapped in a
``torch.profiler`` range, so ``torch.profiler`` measures the runs as they execute, ops and dispatch included.
ONNX Runtime: the kernels of its profiling trace, named by the session's optimized graph (``classify_onnx``,
``ort_run_times``). Both walk their graph in order with ``assign``. Layers are read from the weights a node reads: nodes after one that reads a ``layers.<i>`` tensor belong to block
i, those before the first block to ``embed`` (the embedding and the rotary tables), those after the last node that
reads a block's weight to ``head`` (final norm, lm_head). Kinds:

- ``quantized matmul``: lowbit's quantized linear ops (and the CPU kernels' modules that replace them);
- ``float matmul``: ``linear`` / ``mm`` / ``addmm`` / ``matmul`` / ``bmm`` on float weights;
- ``attention``: the attention op and, inside a block, what runs between the first projection and it (rotary
  embedding, the KV cache concat, head reshapes);
- ``norm``: layer / RMS norms (their statistics, the scaling by the weight);
- ``other``: the rest (residual adds, activations, casts).
"""

from __future__ import annotations

import bisect
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


# What an op is before its place in the graph is known: the walk in ``assign`` turns these into layers and kinds.
QMATMUL, FMATMUL, ATTENTION, NORM, ELEMENTWISE, PASSIVE_OP, OTHER = (
    "qmatmul", "fmatmul", "attention", "norm", "elementwise", "passive", "other")


def assign(ops: list[tuple[object, list[str], str, list]]) -> list[tuple[object, str, str]]:
    """(key, layer, kind) for ops given in graph order as (key, weight names read, base, input keys); see the module
    docstring. ``base``: one of QMATMUL ... OTHER (ELEMENTWISE: a Mul / Add, a norm's when a norm op feeds it)."""
    out, norm_keys = [], set()
    label, kind, in_attention, attention_done = "embed", "other", False, False
    block_of = [next((int(m.group(1)) for w in weights for m in [BLOCK.search(w)] if m), None)
                for _, weights, _, _ in ops]
    last = max((i for i, b in enumerate(block_of) if b is not None), default=len(ops))
    for pos, (key, weights, base, inputs) in enumerate(ops):
        if pos > last:
            label = "head"
        elif block_of[pos] is not None and f"block {block_of[pos]}" != label:
            label, in_attention, attention_done = f"block {block_of[pos]}", False, False
        if base == QMATMUL:
            kind = "quantized matmul"
            # A block's first projection (Q/K/V) opens its attention region.
            in_attention = in_attention or (label.startswith("block") and not attention_done)
        elif base == FMATMUL:
            kind = "float matmul"
        elif base == ATTENTION:
            kind, in_attention, attention_done = "attention", False, True
        elif base == NORM or (base == ELEMENTWISE and any(i in norm_keys for i in inputs)):
            kind = "norm"
        elif in_attention:
            kind = "attention"
        elif base != PASSIVE_OP:
            kind = "other"
        if kind == "norm":
            norm_keys.add(key)
        if out and out[-1][1] != label:
            # A norm reads its weight last: the statistics before it belong to the layer that weight opens.
            i, previous = len(out) - 1, out[-1][1]
            while i >= 0 and out[i][2] == "norm" and out[i][1] == previous:
                out[i] = (out[i][0], label, "norm")
                i -= 1
        out.append((key, label, kind))
    return out


def _fx_base(node) -> str:
    t = node.target
    if node.op == "call_module":
        return QMATMUL                    # the CPU kernels' modules replace lowbit's quantized linear ops
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "lowbit":
        return (QMATMUL if "linear" in t._opname else ATTENTION if t._opname == "attention"
                else NORM if "norm" in t._opname else OTHER)
    if t in FLOAT_MATMULS:
        return FMATMUL
    if isinstance(t, torch._ops.OpOverload) and t._opname in ("scaled_dot_product_attention", "_softmax", "softmax"):
        return ATTENTION
    if t in NORM_OPS:
        return NORM
    if t in (aten.mul.Tensor, aten.add.Tensor):
        return ELEMENTWISE
    return PASSIVE_OP if t in PASSIVE or t is operator.getitem else OTHER


def classify(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str]]:
    """(node, layer, kind) of every call node of a torch program, in graph order."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    return assign([(n, [a.target for a in n.all_input_nodes if a.op == "get_attr"], _fx_base(n), n.all_input_nodes)
                   for n in nodes])


ONNX_BASE = {"MatMulNBits": QMATMUL, "MatMulInteger": QMATMUL, "DynamicQuantizeMatMul": QMATMUL,
             "MatMulIntegerToFloat": QMATMUL, "GatherBlockQuantized": OTHER, "MatMul": FMATMUL, "Gemm": FMATMUL,
             "GroupQueryAttention": ATTENTION, "MultiHeadAttention": ATTENTION, "Attention": ATTENTION,
             "Softmax": ATTENTION, "SkipSimplifiedLayerNormalization": NORM, "SimplifiedLayerNormalization": NORM,
             "SkipLayerNormalization": NORM, "LayerNormalization": NORM, "ReduceMean": NORM, "Sqrt": NORM,
             "Reciprocal": NORM, "Pow": NORM, "Mul": ELEMENTWISE, "Add": ELEMENTWISE, "Div": ELEMENTWISE,
             "Reshape": PASSIVE_OP, "Transpose": PASSIVE_OP, "Cast": PASSIVE_OP, "Unsqueeze": PASSIVE_OP,
             "Squeeze": PASSIVE_OP, "Shape": PASSIVE_OP, "Gather": PASSIVE_OP, "Identity": PASSIVE_OP}


def classify_onnx(graph) -> dict[str, tuple[str, str]]:
    """node name -> (layer, kind) for an ``onnx.GraphProto`` (initializer names carry the layers)."""
    initializers = {i.name for i in graph.initializer}
    producer = {o: n.name for n in graph.node for o in n.output}
    ops = [(n.name, [i for i in n.input if i in initializers], ONNX_BASE.get(n.op_type, OTHER),
            [producer[i] for i in n.input if i in producer]) for n in graph.node]
    return {name: (label, kind) for name, label, kind in assign(ops)}


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


def ort_run_times(trace: list, labels: dict) -> list[dict]:
    """Per ``model_run`` of an ONNX Runtime profiling trace (its events, in order): total ms per (layer, kind) of
    its nodes' kernels, and the run's time outside them as ("onnxruntime", "other"); nodes missing from ``labels``
    (the optimized graph's names) count as ("unmapped", "other")."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    out = [defaultdict(float) for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            continue
        key = labels.get(e["name"][:-len("_kernel_time")], ("unmapped", "other"))
        out[i][key] += e["dur"] / 1e3
    for run, o in zip(runs, out):
        o[("onnxruntime", "other")] = max(0.0, run["dur"] / 1e3 - sum(o.values()))
    return [dict(o) for o in out]
