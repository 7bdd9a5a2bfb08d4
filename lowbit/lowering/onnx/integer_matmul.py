"""Which ``MatMulInteger`` forms ONNX Runtime's CPU kernels compute exactly on every CPU it supports.

ONNX Runtime (MLAS) picks its integer GEMM by the operands' types and the CPU:

- uint8 x int8 on x86 without VNNI (AVX2, AVX-512 core, SSE4.1) multiplies with ``vpmaddubsw``, which adds
  each pair of adjacent u8 * s8 products into a *saturating* int16 before widening to int32. With
  activations up to 255 the pair sum reaches 2 * 255 * 127 = 64770 > 32767: wrong sums, no error. It is
  exact only when |b| <= 64 (2 * 255 * 64 = 32640), which is what ONNX Runtime's ``reduce_range`` relies
  on. With VNNI (``vpdpbusd``), AMX and on ARM64 the same form is exact, so a test on such a machine alone
  cannot see the problem.
- uint8 x uint8 widens both operands to int16 and multiplies with ``vpmaddwd`` (int32 pair sums) on
  SSE/AVX2/AVX-512, and uses int32-accumulating dot products with AVX-VNNI-INT8 and on ARM64: exact
  everywhere, for any values.
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


# Ops whose output has their first input's element type: what may stand between a Cast and a MatMulInteger.
_SAME_TYPE = {"Reshape", "Transpose", "Pad", "Identity", "Squeeze", "Unsqueeze", "Slice", "Flatten", "Expand",
              "Concat", "Gather", "Split"}


def _elem_type(name: str, producers: dict, inits: dict, declared: dict):
    """A value's onnx element type, traced back through its producers to a Cast, a constant or an
    initializer (not from the model's declared types alone, which an edit can leave stale); the declared
    type of a graph input or value_info otherwise; None when unknown."""
    while True:
        if name in inits:
            return inits[name].data_type
        node = producers.get(name)
        if node is None or node.op_type not in _SAME_TYPE | {"Cast", "Constant"}:
            break
        if node.op_type == "Cast":
            return next(a.i for a in node.attribute if a.name == "to")
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else value.data_type
        name = node.input[0]
    return declared.get(name)


def _max_abs(init, base_dir: str) -> int:
    from onnx import numpy_helper

    return int(np.abs(numpy_helper.to_array(init, base_dir).astype(np.int32)).max(initial=0))


def integer_matmul_forms(model, base_dir: str = "") -> list[dict]:
    """One entry per ``MatMulInteger`` node: its name, operand types, form (``u8u8``, ``s8s8``, ``u8s8-7bit``,
    or None when not provably exact on every CPU) and, for an inexact one, why. ``base_dir``: where the model's external
    data lies, if it has any."""
    from onnx import TensorProto

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    declared = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.value_info)
                if vi.type.HasField("tensor_type")}
    type_names = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
    forms = []
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = (type_names.get(t, f"type {t}") for t in
                (_elem_type(node.input[i], producers, inits, declared) for i in (0, 1)))
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
