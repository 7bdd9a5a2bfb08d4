"""W8A8 in ONNX Runtime: the integer matmuls are exact on every CPU, not only on the one running the tests.

ONNX Runtime's uint8 x int8 GEMM saturates on x86 CPUs without VNNI and is exact with VNNI, so running the
graph here proves nothing about other machines. These tests check instead (1) the exported graph's
``MatMulInteger`` forms against those exact everywhere (``integer_matmul``), (2) adversarial inputs, whose
products saturate a non-VNNI u8 x s8 kernel, against exact integer arithmetic, both in this machine's ONNX
Runtime and in an emulation of the non-VNNI kernel, and (3) negative controls that the check and the
emulation catch the saturating form."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.format.quantize import pack_codes
from lowbit.lowering.onnx.translations import translations
from lowbit.lowering.onnx.integer_matmul import check_integer_matmuls, integer_matmul_forms
from lowbit.lowering.onnx.ort_ops import to_matmul_a8
from lowbit.ops import quantize_rows_int8, signed_weight

from tests.conftest import OrtA8, W8A8Layer, non_vnni_matmul_integer


def exact_matmul_integer(a, b, a_zero, b_zero) -> np.ndarray:
    return (a.astype(np.int64) - a_zero) @ (b.astype(np.int64) - b_zero)


def adversarial_layer(bits: int, n: int, k: int, group: int, seed: int):
    """A symmetric layer whose weights sit at the ends of their range in runs of four of one sign along K
    (so every kernel pair is two same-sign extremes), plus the activations that meet them: rows all at
    +max (uint8 code 255 after the shift), rows signed like a weight column, near-max rows, ordinary rows."""
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    signs = torch.randint(0, 2, (n, -(-k // 4)), generator=g).repeat_interleave(4, 1)[:, :k] * 2 - 1
    w = torch.where(signs > 0, half - 1 - torch.randint(0, 3, (n, k), generator=g),
                    -half + torch.randint(0, 3, (n, k), generator=g))
    w[:, torch.randperm(k, generator=g)[: k // 8]] = torch.randint(-half, half, (n, k // 8), generator=g)
    codes = (w + half).to(torch.uint8)
    eff = min(group, k) if group > 0 else k
    scales = (torch.rand(n, -(-k // eff), generator=g) * 0.02 + 0.001).half()
    layer = W8A8Layer(pack_codes(codes, bits), scales, torch.full_like(scales, half, dtype=torch.uint8),
                      torch.randn(n, generator=g), bits, eff, k)
    x = torch.randn(8, k, generator=g)
    x[0] = x[0].abs() + 3.0
    x[1] = signs[0].float() * (2.0 + torch.rand(k, generator=g))
    x[2] = -signs[1].float() * (2.0 + torch.rand(k, generator=g))
    x[3] = torch.sign(torch.randn(k, generator=g)) * (0.95 + 0.05 * torch.rand(k, generator=g))
    return layer, x


def export_a8(layer, path) -> str:
    mod = OrtA8(layer)
    torch.onnx.export(mod, (torch.randn(2, 3, layer.in_features),), str(path), dynamo=True,
                      custom_translation_table=translations(),
                      dynamic_shapes={"x": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}})
    return str(path)


def run_with_integer_operands(path: str, x: torch.Tensor) -> tuple[np.ndarray, list[dict]]:
    """The graph's output for x [M, K] (as a batch of one) and, for each MatMulInteger, its operands, zero points and int32 result as ONNX
    Runtime computed them on this machine (the node's activation input and output added as graph outputs)."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute[0].name == "value"}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    extra = []
    for n in nodes:
        extra += [helper.make_tensor_value_info(n.input[0], TensorProto.UINT8, None),
                  helper.make_tensor_value_info(n.output[0], TensorProto.INT32, None)]
    model.graph.output.extend(extra)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x[None].numpy()})
    found = []
    for i, n in enumerate(nodes):
        zero = [int({**inits, **consts}[n.input[j]]) if len(n.input) > j and n.input[j] else 0 for j in (2, 3)]
        found.append({"a": outs[1 + 2 * i], "b": inits[n.input[1]], "a_zero": zero[0], "b_zero": zero[1],
                      "acc": outs[2 + 2 * i]})
    return outs[0], found


CASES = [(8, 128, 0), (8, 100, 32), (8, 96, 96), (4, 96, 32), (4, 128, 0), (7, 64, 0)]


@pytest.mark.parametrize("bits,k,group", CASES)
def test_integer_matmuls_exact_on_adversarial_inputs(bits, k, group, tmp_path):
    layer, x = adversarial_layer(bits, 24, k, group, seed=bits * 1000 + k)
    path = export_a8(layer, tmp_path / "a8.onnx")
    want = "u8u8" if bits == 8 else "u8s8-7bit"
    assert [f["form"] for f in integer_matmul_forms(onnx.load(path))] == [want]
    assert to_matmul_a8(layer.qweight, layer.scales, layer.zeros, bits, layer.group_size, k)["w"].dtype == \
        (torch.uint8 if bits == 8 else torch.int8)
    y, (mm,) = run_with_integer_operands(path, x)
    # The activation codes are quantize_rows_int8's, bit for bit (grouped: padded with the zero point).
    q, _ = quantize_rows_int8(x)
    g = -(-k // layer.group_size)
    expect_a = (q.to(torch.int16) + 128).to(torch.uint8)
    if g > 1:
        expect_a = F.pad(expect_a, (0, g * layer.group_size - k), value=128).view(-1, g, layer.group_size)
        expect_a = expect_a.transpose(0, 1)                                       # [G, M, group]
    else:
        expect_a = expect_a[None]                                                 # [1, M, K]
    assert np.array_equal(mm["a"], expect_a.numpy())
    exact = exact_matmul_integer(mm["a"], mm["b"], mm["a_zero"], mm["b_zero"])
    # The weight operand is the layer's signed weight (after the zero point), and the int32 sums are exact:
    # in this machine's ONNX Runtime, and in the non-VNNI kernel's arithmetic whatever this machine has.
    w = signed_weight(layer.qweight, layer.zeros, bits, k, layer.group_size).numpy().astype(np.int64)
    b = mm["b"].astype(np.int64) - mm["b_zero"]
    assert np.array_equal(b if g == 1 else b.reshape(-1, 24)[:k], w.T)
    assert np.array_equal(mm["acc"], exact)
    assert np.array_equal(non_vnni_matmul_integer(mm["a"], mm["b"], mm["a_zero"], mm["b_zero"]), exact)
    assert int(np.abs(exact).max()) > 2 ** 15 or bits < 8        # the sums need more than int16
    ref = layer(x)
    assert float((torch.from_numpy(y[0]) - ref).abs().max() / ref.abs().max()) < 1e-6


def _u8s8_graph(w: np.ndarray, b_is_input: bool = False, a_type=TensorProto.UINT8) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("A", a_type, [None, w.shape[0]])]
    inits = [numpy_helper.from_array(np.array(128, np.uint8 if a_type == TensorProto.UINT8 else np.int8), "za")]
    if b_is_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.INT8, list(w.shape)))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    node = helper.make_node("MatMulInteger", ["A", "W", "za"], ["Y"], name="mm")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_saturating_form_is_caught_on_any_cpu(tmp_path):
    """Negative controls: the uint8 x int8 form with 8-bit weights (what lowbit emitted before) is wrong on
    the adversarial inputs in the non-VNNI kernel's arithmetic, and the form check refuses it."""
    layer, x = adversarial_layer(8, 24, 128, 0, seed=5)
    q, _ = quantize_rows_int8(x)
    a = (q.to(torch.int16) + 128).to(torch.uint8).numpy()
    w = signed_weight(layer.qweight, layer.zeros, 8, 128, 128).numpy().T.copy()         # int8 [K, N]
    exact = exact_matmul_integer(a, w, 128, 0)
    emulated = non_vnni_matmul_integer(a, w, 128, 0)
    assert not np.array_equal(emulated, exact)
    assert float(np.abs(emulated - exact).max() / np.abs(exact).max()) > 0.05
    # The same weights as uint8 with zero point 128 (lowbit's form) emulate exactly.
    w_u8 = (w.astype(np.int16) + 128).astype(np.uint8)
    assert np.array_equal(non_vnni_matmul_integer(a, w_u8, 128, 128), exact)

    bad = _u8s8_graph(w)
    (form,) = integer_matmul_forms(bad)
    assert form["form"] is None and "saturate" in form["why"] and (form["a"], form["b"]) == ("uint8", "int8")
    with pytest.raises(LowbitError, match="not exact on every CPU"):
        check_integer_matmuls(bad)
    # This machine's ONNX Runtime on the saturating form: exact with VNNI, and exactly the emulated wrong
    # sums without it (which confirms the emulation models the real kernel).
    got = ort.InferenceSession(bad.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    assert np.array_equal(got, exact) or np.array_equal(got, emulated)

    # An exported uint8 x uint8 graph edited back to uint8 x int8 (its declared types left stale) is refused:
    # the check traces operand types to their Cast and initializer.
    path = export_a8(layer, tmp_path / "a8.onnx")
    edited = onnx.load(path)
    (node,) = [n for n in edited.graph.node if n.op_type == "MatMulInteger"]
    init = next(i for i in edited.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init).astype(np.int16) - 128).astype(np.int8),
                                          init.name))
    del node.input[3]
    assert [f["form"] for f in integer_matmul_forms(onnx.load(path))] == ["u8u8"]
    assert integer_matmul_forms(edited)[0]["form"] is None

    small = np.clip(w, -64, 64).astype(np.int8)
    assert [f["form"] for f in integer_matmul_forms(_u8s8_graph(small))] == ["u8s8-7bit"]
    assert np.array_equal(non_vnni_matmul_integer(a, small, 128, 0), exact_matmul_integer(a, small, 128, 0))
    assert integer_matmul_forms(_u8s8_graph(small, b_is_input=True))[0]["form"] is None     # no bound provable
    assert check_integer_matmuls(_u8s8_graph(small)) == {"u8s8-7bit": 1}
