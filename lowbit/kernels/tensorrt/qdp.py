"""lowbit's plugins as TensorRT quickly deployable plugins (``tensorrt.plugin``, TensorRT >= 10.7).

Importing this module registers every plugin of the catalog (``lowbit.kernels.tensorrt``) with TensorRT: its
output shapes and types (``@trtp.register``), the data types it accepts and its tactics (``@trtp.autotune``), a
JIT implementation that launches the Triton kernel through Triton on TensorRT's stream (``@trtp.impl``) and an
AOT implementation that hands TensorRT the kernel's PTX and launch geometry (``@trtp.aot_impl``, compiled by
``kernels.compile_aot`` for the GPU the engine is built on), so an engine whose plugin nodes say ``aot = 1``
runs without Python. Import it before parsing the ONNX model or deserializing an engine. Needs TensorRT, Triton
and, for the JIT implementation, torch with CUDA.
"""

from __future__ import annotations

from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from lowbit.kernels.tensorrt import kernels

_TORCH = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.float32: torch.float32,
          trt.int8: torch.int8}
FLOATS = "FP16|BF16|FP32"


def _shape(desc) -> list:
    return [desc.shape_expr[i] for i in range(desc.ndim)]


def _quant_outputs(x, width=None):
    """(codes int8 like x with last dimension ``width``, row scales float32 [..., 1])."""
    lead = _shape(x)[:-1]
    codes = trtp.from_shape_expr(tuple(lead + [width if width is not None else x.shape_expr[x.ndim - 1]]),
                                 dtype=trt.int8)
    return codes, trtp.from_shape_expr(tuple(lead + [1]), dtype=trt.float32)


# ---- shapes and types --------------------------------------------------------------------------------------------
@trtp.register("lowbit::quantize_int8")
def _quantize_desc(x: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _quant_outputs(x)


@trtp.register("lowbit::rmsnorm_quant_int8")
def _rmsnorm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, eps: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _quant_outputs(x)


@trtp.register("lowbit::layernorm_quant_int8")
def _layernorm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                    eps: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _quant_outputs(x)


@trtp.register("lowbit::act_mul_quant_int8")
def _act_mul_desc(y: trtp.TensorDesc, act: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _quant_outputs(y, y.shape_expr[y.ndim - 1] // 2)


@trtp.register("lowbit::int8_linear")
def _int8_linear_desc(codes: trtp.TensorDesc, scales: trtp.TensorDesc, weight: trtp.TensorDesc,
                      weight_scales: trtp.TensorDesc, bias: trtp.TensorDesc, group_size: int) -> trtp.TensorDesc:
    return trtp.from_shape_expr(tuple(_shape(codes)[:-1] + [weight.shape_expr[0]]), dtype=bias.dtype)


# ---- accepted types and tactics ----------------------------------------------------------------------------------
@trtp.autotune("lowbit::quantize_int8")
def _quantize_tune(x, outputs):
    return [trtp.AutoTuneCombination(f"{FLOATS}, INT8, FP32")]


@trtp.autotune("lowbit::rmsnorm_quant_int8")
def _rmsnorm_tune(x, weight, eps, outputs):
    return [trtp.AutoTuneCombination(f"{FLOATS}, {FLOATS}, INT8, FP32")]


@trtp.autotune("lowbit::layernorm_quant_int8")
def _layernorm_tune(x, weight, bias, eps, outputs):
    return [trtp.AutoTuneCombination(f"{FLOATS}, {FLOATS}, {FLOATS}, INT8, FP32")]


@trtp.autotune("lowbit::act_mul_quant_int8")
def _act_mul_tune(y, act, outputs):
    return [trtp.AutoTuneCombination(f"{FLOATS}, INT8, FP32")]


@trtp.autotune("lowbit::int8_linear")
def _int8_linear_tune(codes, scales, weight, weight_scales, bias, group_size, outputs):
    c = trtp.AutoTuneCombination(f"INT8, FP32, INT8, FP32, {FLOATS}, {FLOATS}")
    c.tactics(sorted(kernels.TACTICS))
    return [c]


# ---- JIT: Triton's launcher on TensorRT's stream -------------------------------------------------------------------
def _run(name: str, inputs, outputs, stream: int, attrs: dict, tactic: int = 1):
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        ins = [torch.as_tensor(t, device="cuda") for t in inputs]
        outs = [torch.as_tensor(t, device="cuda") for t in outputs]
        kernels.launch(name, ins, attrs, tactic, out=outs)


@trtp.impl("lowbit::quantize_int8")
def _quantize_impl(x: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run("quantize_int8", [x], outputs, stream, {})


@trtp.impl("lowbit::rmsnorm_quant_int8")
def _rmsnorm_impl(x: trtp.Tensor, weight: trtp.Tensor, eps: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run("rmsnorm_quant_int8", [x, weight], outputs, stream, {"eps": eps})


@trtp.impl("lowbit::layernorm_quant_int8")
def _layernorm_impl(x: trtp.Tensor, weight: trtp.Tensor, bias: trtp.Tensor, eps: float,
                    outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run("layernorm_quant_int8", [x, weight, bias], outputs, stream, {"eps": eps})


@trtp.impl("lowbit::act_mul_quant_int8")
def _act_mul_impl(y: trtp.Tensor, act: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run("act_mul_quant_int8", [y], outputs, stream, {"act": act})


@trtp.impl("lowbit::int8_linear")
def _int8_linear_impl(codes: trtp.Tensor, scales: trtp.Tensor, weight: trtp.Tensor, weight_scales: trtp.Tensor,
                      bias: trtp.Tensor, group_size: int, outputs: Tuple[trtp.Tensor], stream: int,
                      tactic: int) -> None:
    _run("int8_linear", [codes, scales, weight, weight_scales, bias], outputs, stream, {"group_size": group_size},
         tactic)


# ---- AOT: the kernel's PTX, compiled for this GPU, and its launch geometry -----------------------------------------
def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _concrete(desc) -> list:
    """A shape with its build-time constants as ints and 1 for the dynamic dimensions (the row count)."""
    return [e.constant_value() if e.is_constant else 1 for e in _shape(desc)]


def _aot(name: str, descs: list, attrs: dict, tactic: int = 1):
    float_desc = descs[4] if name == "int8_linear" else descs[0]
    compiled = kernels.compile_aot(name, [_concrete(d) for d in descs], _TORCH[float_desc.dtype], attrs, _arch(),
                                   tactic)
    x = descs[0]
    rows = _shape(x)[0]
    for e in _shape(x)[1:-1]:
        rows = rows * e
    scalars = {"M": rows, "K": x.shape_expr[x.ndim - 1] if name != "act_mul_quant_int8"
               else x.shape_expr[x.ndim - 1] // 2}
    params = trtp.KernelLaunchParams()
    if name == "int8_linear":
        n = descs[2].shape_expr[0]
        scalars.update(N=n, K=descs[2].shape_expr[1], GROUP=compiled["scalar_values"]["GROUP"])
        params.grid_x = trtp.cdiv(rows, compiled["rows_per_program"]) * trtp.cdiv(n, compiled["cols_per_program"])
    else:
        params.grid_x = rows
    params.block_x = compiled["num_warps"] * 32
    params.shared_mem = compiled["shared"]
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[s]) for s in compiled["scalars"]])
    return compiled["kernel_name"].encode(), compiled["ptx"].encode(), params, extra


@trtp.aot_impl("lowbit::quantize_int8")
def _quantize_aot(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot("quantize_int8", [x], {})


@trtp.aot_impl("lowbit::rmsnorm_quant_int8")
def _rmsnorm_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, eps: float, outputs: Tuple[trtp.TensorDesc],
                 tactic: int):
    return _aot("rmsnorm_quant_int8", [x, weight], {"eps": eps})


@trtp.aot_impl("lowbit::layernorm_quant_int8")
def _layernorm_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, eps: float,
                   outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot("layernorm_quant_int8", [x, weight, bias], {"eps": eps})


@trtp.aot_impl("lowbit::act_mul_quant_int8")
def _act_mul_aot(y: trtp.TensorDesc, act: str, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot("act_mul_quant_int8", [y], {"act": act})


@trtp.aot_impl("lowbit::int8_linear")
def _int8_linear_aot(codes: trtp.TensorDesc, scales: trtp.TensorDesc, weight: trtp.TensorDesc,
                     weight_scales: trtp.TensorDesc, bias: trtp.TensorDesc, group_size: int,
                     outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot("int8_linear", [codes, scales, weight, weight_scales, bias], {"group_size": group_size}, tactic)

