"""Which ``MatMulInteger`` forms ONNX Runtime's CPU kernels compute exactly on every CPU it supports.

ONNX Runtime (MLAS) picks its integer GEMM by the operands' types and the CPU:

- uint8 x int8 on x86 without VNNI (AVX2, AVX-512 core, SSE4.1) multiplies with ``vpmaddubsw``, which adds
  each pair of adjacent u8 * s8 products into a *saturating* int16 before widening to int32. With
  activations up to 255 the pair sum reaches 2 * 255 * 127 = 64770 > 32767: wrong sums, no error. It is
  exact only when |b| <= 64 (2 * 255 * 64 = 32640), which is what ONNX Runtime's ``reduce_range`` relies
  on. With VNNI (``vpdpbusd``), AMX and on ARM64 the same form is exact, so a test on such a machine alone
  cannot see the problem.
- uint8 x uint8 widens both operands to int16 and multiplies with ``vpmaddwd`` (int32 pair sums) on
  SSE/AVX2/AVX-512, ``vpdpbuud`` with AVX-VNNI-INT8, and widening or dot-product instructions on ARM64:
  exact everywhere, for any values.
- int8 x int8 is exact everywhere too, but on x86 without AVX-VNNI-INT8 it runs MLAS's portable C kernel,
  about ten times slower than the others (``bench/ort_int8_forms.py``).

So the lowering emits uint8 x uint8 for 8-bit weights and uint8 x int8 only for weights of at most 7 bits
(|w| <= 64), and ``check_integer_matmuls`` proves every ``MatMulInteger`` of an exported graph is one of
these exact forms before it ships.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError

# |b| bound under which a saturating u8 x s8 pair sum cannot overflow int16: 2 * 255 * 64 = 32640.
U8S8_EXACT_MAX_ABS_B = 64
FORMS = {"u8u8": "uint8 x uint8", "s8s8": "int8 x int8", "u8s8-7bit": "uint8 x int8 with |b| <= 64"}


def _elem_types(model) -> dict:
    """value name -> onnx element type, for graph inputs, initializers and every inferred intermediate."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _max_abs(init, base_dir: str) -> int:
    from onnx import numpy_helper

    return int(np.abs(numpy_helper.to_array(init, base_dir).astype(np.int32)).max(initial=0))


def integer_matmul_forms(model, base_dir: str = "") -> list[dict]:
    """One entry per ``MatMulInteger`` node: its name, operand types, form (a ``FORMS`` key, or None when
    not provably exact on every CPU) and, for an inexact one, why. ``base_dir``: where the model's external
    data lies, if it has any."""
    from onnx import TensorProto

    if not any(n.op_type == "MatMulInteger" for n in model.graph.node):
        return []
    types = _elem_types(model)
    inits = {init.name: init for init in model.graph.initializer}
    name = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
    forms = []
    for node in model.graph.node:
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = (name.get(types.get(node.input[i]), f"type {types.get(node.input[i])}") for i in (0, 1))
        form, why = None, None
        if (a, b) == ("uint8", "uint8"):
            form = "u8u8"
        elif (a, b) == ("int8", "int8"):
            form = "s8s8"
        elif (a, b) == ("uint8", "int8"):
            init = inits.get(node.input[1])
            if init is None:
                why = "its int8 weight is not a constant, so no bound on |w| can be proven"
            elif (m := _max_abs(init, base_dir)) > U8S8_EXACT_MAX_ABS_B:
                why = (f"its int8 weight reaches |w| = {m} > {U8S8_EXACT_MAX_ABS_B}, so pair sums can saturate "
                       "int16 on x86 CPUs without VNNI")
            else:
                form = "u8s8-7bit"
        else:
            why = f"{a} x {b} is not a combination ONNX Runtime computes exactly on every CPU"
        forms.append({"node": node.name, "a": a, "b": b, "form": form, "why": why})
    return forms


def check_integer_matmuls(model, base_dir: str = "") -> dict:
    """Counts of each exact form in ``model``; raises LowbitError naming the first inexact ``MatMulInteger``."""
    counts: dict = {}
    for f in integer_matmul_forms(model, base_dir):
        if f["form"] is None:
            raise LowbitError(f"ONNX MatMulInteger '{f['node']}' ({f['a']} x {f['b']}) is not exact on every CPU: "
                              f"{f['why']}; this is a lowbit bug, please report it")
        counts[f["form"]] = counts.get(f["form"], 0) + 1
    return counts
