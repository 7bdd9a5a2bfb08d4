"""lowbit's TensorRT plugins: what TensorRT has no layer for, as ``tensorrt.plugin`` plugins (TensorRT >= 10.7).

TensorRT takes INT4 weights natively (blocked ``DequantizeLinear``, symmetric) but has no per-token dynamic INT8
activation quantization and no INT8 x INT8 GEMM behind it, which ZeroQuant's W8A8 needs. These plugins supply
them, from the same Triton kernels the torch runtime runs on CUDA (``kernels/triton``):

- ``lowbit::quantize_int8(x) -> (codes, scales)``: per-token symmetric INT8, ``codes`` int8 like x, ``scales``
  float32 [..., 1] (``ops.quantize_rows_int8``, bit for bit);
- ``lowbit::rmsnorm_quant_int8(x, weight; eps)``, ``lowbit::layernorm_quant_int8(x, weight, bias; eps)``: the norm,
  then the same quantization, in one kernel (the fusion rule ``norm_quant``);
- ``lowbit::act_mul_quant_int8(y; act)``: ``act(gate) * up`` over y's two halves, then the quantization
  (the fusion rule ``act_mul``); codes are half as wide as y;
- ``lowbit::int8_linear(codes, scales, weight, weight_scales, bias; group_size) -> y``: the exact int32 product of
  the codes with int8 weights [N, K] per group of ``group_size`` along K, times the weight scales [N, G] (float32),
  times the row scales, plus bias [N]; y in the bias' dtype.

This module is the catalog (names, inputs, attributes, output shapes) and needs neither TensorRT nor a GPU:
``kernels`` holds the Triton kernels in the plugins' argument order (JIT launch, and PTX for the AOT
implementation), ``reference`` the reference implementations (and ONNX Runtime custom ops running them, to
validate the TensorRT ONNX here), ``qdp`` the ``tensorrt.plugin`` definitions (imported only where TensorRT is),
``engine`` the engine build.

In ONNX a plugin node has the plugin's name as op type, the string attribute ``plugin_namespace = "lowbit"`` and
``aot = 1`` (the AOT implementation: the engine then runs without Python), in the domain ``PLUGIN_DOMAIN``.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "lowbit"
PLUGIN_DOMAIN = "lowbit.tensorrt"
FLOAT, INT8, FLOAT32 = "float", "int8", "float32"      # "float": the graph's float dtype (fp16, bf16 or fp32)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class Plugin:
    name: str
    inputs: tuple[str, ...]         # input names
    input_kinds: tuple[str, ...]    # FLOAT, INT8 or FLOAT32 per input
    output_kinds: tuple[str, ...]
    attrs: tuple[tuple[str, type], ...]
    summary: str

    @property
    def id(self) -> str:
        return f"{NAMESPACE}::{self.name}"


_QUANT = (INT8, FLOAT32)
PLUGINS = {p.name: p for p in (
    Plugin("quantize_int8", ("x",), (FLOAT,), _QUANT, (), "per-token INT8 quantization"),
    Plugin("rmsnorm_quant_int8", ("x", "weight"), (FLOAT, FLOAT), _QUANT, (("eps", float),),
           "RMSNorm, then per-token INT8 quantization"),
    Plugin("layernorm_quant_int8", ("x", "weight", "bias"), (FLOAT, FLOAT, FLOAT), _QUANT, (("eps", float),),
           "LayerNorm, then per-token INT8 quantization"),
    Plugin("act_mul_quant_int8", ("y",), (FLOAT,), _QUANT, (("act", str),),
           "act(gate) * up, then per-token INT8 quantization"),
    Plugin("int8_linear", ("codes", "scales", "weight", "weight_scales", "bias"), (INT8, FLOAT32, INT8, FLOAT32, FLOAT),
           (FLOAT,), (("group_size", int),), "INT8 x INT8 GEMM, int32 sums per weight group, float rescale"),
)}


def output_shapes(name: str, shapes: list[list]) -> list[list]:
    """Output shapes of plugin ``name`` from its input shapes (entries may be symbolic)."""
    x = list(shapes[0])
    if name == "int8_linear":
        return [x[:-1] + [shapes[2][0]]]
    codes = x[:-1] + [x[-1] // 2] if name == "act_mul_quant_int8" else x
    return [codes, x[:-1] + [1]]


def describe() -> dict:
    """The plugin catalog as the artifact's ``tensorrt/plugins.json`` records it."""
    return {"namespace": NAMESPACE, "onnx_domain": PLUGIN_DOMAIN, "tensorrt": ">=10.7 (tensorrt.plugin)",
            "plugins": {p.name: {"inputs": dict(zip(p.inputs, p.input_kinds)), "outputs": list(p.output_kinds),
                                 "attributes": {k: t.__name__ for k, t in p.attrs}, "summary": p.summary}
                        for p in PLUGINS.values()}}
