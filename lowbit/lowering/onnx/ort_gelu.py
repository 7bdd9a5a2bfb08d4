"""The tanh GELU as ONNX Runtime's ``com.microsoft::FastGelu``: a rewrite rule on the exported ONNX graph, for the
form GPT-2's ``NewGELUActivation`` exports to, which onnxscript's ``fuse_gelu`` does not match::

    Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), sqrt(2/pi))), 1))

(either operand order of every Mul and Add). ``FastGelu(x)`` computes the same formula in one pass.
"""

from __future__ import annotations

import math

from lowbit.lowering.onnx.onnx_match import CONTRIB, const_array, producer

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _scalar(value):
    c = const_array(value)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def _with_constant(value, op_type: str, k: float):
    """x when ``value`` is op_type(x, k) or op_type(k, x) with the constant k (to 1e-4 relative), else None."""
    node = producer(value, op_type)
    if node is None or len(node.inputs) != 2:
        return None
    for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        s = _scalar(c)
        if s is not None and math.isclose(s, k, rel_tol=1e-4):
            return x
    return None


def tanh_gelu_input(node):
    """x when the Mul ``node`` computes 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), else None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    for half, one_plus in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        x, tanh = _with_constant(half, "Mul", 0.5), producer(_with_constant(one_plus, "Add", 1.0), "Tanh")
        add = producer(_with_constant(tanh.inputs[0], "Mul", SQRT_2_OVER_PI), "Add") if tanh is not None else None
        if x is None or add is None:
            continue
        for y, term in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            cube = producer(_with_constant(term, "Mul", 0.044715), "Pow")
            if y is x and cube is not None and cube.inputs[0] is x and _scalar(cube.inputs[1]) == 3.0:
                return x
    return None


def fuse_tanh_gelu(model) -> int:
    """Rewrite every match in place; how many."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, fused = model.graph, 0
    for node in list(graph):
        x = tanh_gelu_input(node)
        if x is None:
            continue
        gelu = ir.Node(CONTRIB, "FastGelu", [x])
        graph.insert_before(node, [gelu])
        out = node.outputs[0]
        gelu.outputs[0].type, gelu.outputs[0].shape = out.type, out.shape
        if out in graph.outputs:
            graph.outputs[list(graph.outputs).index(out)] = gelu.outputs[0]
        ir.convenience.replace_all_uses_with(out, gelu.outputs[0])
        fused += 1
    if fused:
        RemoveUnusedNodesPass()(model)
    return fused
