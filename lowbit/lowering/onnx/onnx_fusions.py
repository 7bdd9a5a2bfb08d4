"""ONNX Runtime's fused operators, produced by rewrite rules on the exported ONNX graph (onnxscript's ORT
fusion rule sets, pattern -> replacement on the ONNX IR). A rule that does not match leaves the plain ops; the
counts go to the manifest (``onnx.fusions``) and ``lowbit inspect``.

- ``SimplifiedLayerNormalization``: transformers' RMSNorm (pow, mean, add eps, rsqrt, mul, weight);
- ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``: the residual Add feeding an RMSNorm /
  LayerNorm, one op that also returns the sum for the next residual;
- ``Gelu`` / ``FastGelu``: the erf and tanh GELU formulas (onnxscript's rules, and ours, ``ort_gelu.py``, for the
  form GPT-2's GELU exports to);
- ``GroupQueryAttention``: a causal LM's rotary embedding, KV cache concat and attention, one op per layer (our
  own rule, ``ort_attention.py``), when the caller says the model's mask is plain causal + padding.

The fused ops compute the same float32 math in one pass (the rewritten graph is checked against the unfused one
in the tests, to 1e-4). W8A8's per-token quantization stays after the norm, so its semantics are unchanged.
"""

from __future__ import annotations

# (fused op, the onnxscript rule set's module and function), in the order they must run: the RMSNorm match
# first, since the skip rule matches an Add feeding SimplifiedLayerNormalization.
RULES = [("Gelu", "erfgelu", "fuse_erfgelu"),
         ("FastGelu", "gelu", "fuse_gelu"),
         ("SimplifiedLayerNormalization", "rms_normalization", "fuse_rms_normalization"),
         ("SkipSimplifiedLayerNormalization", "skip_normalization", "fuse_skip_rms_normalization"),
         ("SkipLayerNormalization", "skip_normalization", "fuse_skip_layer_normalization")]


def fuse_for_ort(model, attention: dict | None = None) -> tuple[dict, dict]:
    """Apply the rules to an ``onnx_ir`` model in place: ``({fused op: matches}, {fused op: why a layer kept its
    plain ops})``; ``({"unavailable": why}, {})`` when this onnxscript lacks the rule sets (the graph then keeps
    its plain ops). ``attention``: ``{"kv_heads": [per layer], "max_positions": n}`` to fuse a causal LM's
    attention, or None."""
    import importlib

    from lowbit.lowering.onnx.ort_attention import fuse_group_query_attention
    from lowbit.lowering.onnx.ort_gelu import fuse_tanh_gelu

    counts, missed = {}, {}
    if attention is not None:
        counts["GroupQueryAttention"], skipped = fuse_group_query_attention(model, attention["kv_heads"],
                                                                            attention["max_positions"])
        if skipped:
            missed["GroupQueryAttention"] = skipped[0] + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1
                                                          else "")
    for op, module, fn in RULES:
        try:
            rule = getattr(importlib.import_module(f"onnxscript.rewriter.ort_fusions.{module}"), fn)
        except (ImportError, AttributeError):
            import onnxscript

            return {"unavailable": f"onnxscript {onnxscript.__version__} has no ort_fusions.{module}.{fn}"}, {}
        counts[op] = int(rule(model))
    counts["FastGelu"] += fuse_tanh_gelu(model)
    # The RMSNorm match is a step towards the skip fusion: one no residual Add feeds (the first block's) goes back to
    # plain ops, since ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain, where onnx.checker
    # does not know it.
    counts["SimplifiedLayerNormalization"] = 0
    for node in [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
        _unfuse_rms_norm(model.graph, node)
    _drop_unused_outputs(model.graph)
    return counts, missed


# Fused norms' optional statistics outputs (mean, inverse std. dev.): ONNX Runtime computes and stores every output
# that has a name, ~4 us per norm and decode step on the demo LM.
OPTIONAL_STATS = {"SkipSimplifiedLayerNormalization": (1, 2), "SkipLayerNormalization": (1, 2),
                  "LayerNormalization": (1, 2)}


def _drop_unused_outputs(graph) -> None:
    outputs = set(id(v) for v in graph.outputs)
    for node in graph:
        for i in OPTIONAL_STATS.get(node.op_type, ()):
            if i < len(node.outputs) and not node.outputs[i].uses() and id(node.outputs[i]) not in outputs:
                node.outputs[i].name = ""


def _unfuse_rms_norm(graph, node) -> None:
    """SimplifiedLayerNormalization(x, w) over the last axis -> w * (x * 1 / sqrt(mean(x ^ 2) + eps)), in float32:
    the exported norm's own ops in its order (``ops.rms_norm_reference``'s). Rounded differently, a norm that
    feeds a per-token INT8 quantization moves codes across rounding boundaries, and W8A8 models amplify such
    flips (tests/lowering/onnx/test_onnx.py, Gemma-3)."""
    import numpy as np
    import onnx_ir as ir

    x, w = node.inputs[0], node.inputs[1]
    attrs = {a.name: a.value for a in node.attributes.values()}
    if attrs.get("axis", -1) != -1:
        raise ValueError(f"SimplifiedLayerNormalization over axis {attrs['axis']}")

    def const(name, array):
        value = ir.Value(name=f"{node.name}_{name}", const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    axes = const("axes", np.array([-1], np.int64))
    eps = const("eps", np.array(attrs.get("epsilon", 1e-5), np.float32))
    two = const("two", np.array(2.0, np.float32))
    square = ir.Node("", "Pow", [x, two])
    mean = ir.Node("", "ReduceMean", [square.outputs[0], axes], [ir.AttrInt64("keepdims", 1)])
    add = ir.Node("", "Add", [mean.outputs[0], eps])
    rms = ir.Node("", "Sqrt", [add.outputs[0]])
    inv = ir.Node("", "Reciprocal", [rms.outputs[0]])
    normed = ir.Node("", "Mul", [x, inv.outputs[0]])
    out = ir.Node("", "Mul", [w, normed.outputs[0]])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [square, mean, add, rms, inv, normed, out],
                                            [node.outputs[0]], [out.outputs[0]])
