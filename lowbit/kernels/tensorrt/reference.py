"""Reference implementations of the TensorRT plugins (``lowbit.kernels.tensorrt``) on lowbit's reference kernels,
and ONNX Runtime custom ops that run them, so the TensorRT ONNX runs here without TensorRT.

``run(name, inputs, attrs)`` is the plugin's semantics in plain PyTorch (any device); ``ort_model(model)`` maps
every plugin node of a TensorRT ONNX to an onnxruntime-extensions Python op calling ``run``, and
``session_options()`` gives the SessionOptions that load those ops.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit import ops
from lowbit.kernels.tensorrt import FLOAT, INT8, PLUGINS

PYOP_DOMAIN = "ai.onnx.contrib"             # where onnxruntime-extensions looks up Python ops


def int8_linear_reference(codes: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
                          bias: torch.Tensor, group_size: int) -> torch.Tensor:
    """``int8_linear`` as ``ops.w8a8_linear_codes_reference``: the int8 weight is the stored layout's 8-bit code
    minus its zero point 128."""
    k = weight.shape[1]
    stored = (weight.to(torch.int16) + 128).to(torch.uint8)
    zeros = torch.full(weight_scales.shape, 128, dtype=torch.uint8, device=weight.device)
    return ops.w8a8_linear_codes_reference(codes, scales, stored, weight_scales, zeros, bias, 8, group_size, k,
                                           bias.dtype)


def run(name: str, inputs: list[torch.Tensor], attrs: dict) -> tuple[torch.Tensor, ...]:
    """Plugin ``name`` on ``inputs`` (torch tensors) with ``attrs``: its outputs."""
    if name == "quantize_int8":
        return ops.quantize_rows_int8(inputs[0])
    if name == "rmsnorm_quant_int8":
        return ops.rmsnorm_quant_int8_reference(*inputs, attrs["eps"])
    if name == "layernorm_quant_int8":
        return ops.layernorm_quant_int8_reference(*inputs, attrs["eps"])
    if name == "act_mul_quant_int8":
        return ops.act_mul_quant_int8_reference(inputs[0], attrs["act"])
    if name == "int8_linear":
        return (int8_linear_reference(*inputs, attrs["group_size"]),)
    raise KeyError(f"no TensorRT plugin {name!r}")


def _pyop_name(name: str) -> str:
    return f"lowbit_trt_{name}"


_registered: list = []


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise LowbitError("running a TensorRT artifact's ONNX in ONNX Runtime needs onnxruntime-extensions for the "
                          "plugins' reference implementations: pip install onnxruntime-extensions") from None
    return onnxruntime_extensions


def register_pyops() -> None:
    """Register each plugin with onnxruntime-extensions as a Python op (once). Python ops take no float16: the
    plugins' float tensors are float32 there."""
    if _registered:
        return
    ext = _extensions()
    dt = ext.PyCustomOpDef
    kinds = {FLOAT: dt.dt_float, INT8: dt.dt_int8, "float32": dt.dt_float}
    attr_types = {float: dt.dt_float, int: dt.dt_int64, str: dt.dt_string}
    for plugin in PLUGINS.values():
        def body(*arrays, _name=plugin.name, **attrs):
            outs = run(_name, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], attrs)
            return tuple(o.numpy() for o in outs) if len(outs) > 1 else outs[0].numpy()
        ext.onnx_op(op_type=_pyop_name(plugin.name), inputs=[kinds[k] for k in plugin.input_kinds],
                    outputs=[kinds[k] for k in plugin.output_kinds],
                    attrs={k: attr_types[t] for k, t in plugin.attrs})(body)
    _registered.append(True)


def ort_model(model, float_dtype: str):
    """A copy of an ``onnx`` ModelProto whose plugin nodes call the reference implementations (Python ops of
    onnxruntime-extensions, registered here). Python ops take no float16, so in a float16 graph each plugin's
    float inputs are cast to float32 and its float outputs back, as the kernels compute in float32 and round
    their output."""
    import onnx
    from onnx import TensorProto, helper

    from lowbit.kernels.tensorrt import PLUGIN_DOMAIN

    register_pyops()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    widen = float_dtype != "float32"
    narrow_type = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}.get(float_dtype)
    nodes = []
    for node in out.graph.node:
        if node.domain != PLUGIN_DOMAIN:
            nodes.append(node)
            continue
        plugin = PLUGINS[node.op_type]
        keep = {k for k, _ in plugin.attrs}
        attrs = [a for a in node.attribute if a.name in keep]
        node.ClearField("attribute")
        node.attribute.extend(attrs)
        node.op_type, node.domain = _pyop_name(plugin.name), PYOP_DOMAIN
        if widen:
            for i, kind in enumerate(plugin.input_kinds):
                if kind == FLOAT:
                    wide = f"{node.name}_in{i}_f32"
                    nodes.append(helper.make_node("Cast", [node.input[i]], [wide], to=TensorProto.FLOAT))
                    node.input[i] = wide
        nodes.append(node)
        if widen:
            for i, kind in enumerate(plugin.output_kinds):
                if kind == FLOAT:
                    wide = f"{node.name}_out{i}_f32"
                    nodes.append(helper.make_node("Cast", [wide], [node.output[i]], to=narrow_type))
                    node.output[i] = wide
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    others = [o for o in out.opset_import if o.domain not in (PLUGIN_DOMAIN, PYOP_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(others + [onnx.helper.make_opsetid(PYOP_DOMAIN, 1)])
    return out


def session_options(threads: int = 0, base: Optional[object] = None):
    """ONNX Runtime SessionOptions with onnxruntime-extensions' custom op library loaded."""
    import onnxruntime as ort

    opts = base or ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(_extensions().get_library_path())
    return opts
