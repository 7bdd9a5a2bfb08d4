"""The shipped program: an fx graph of ``aten`` / ``lowbit`` ops as JSON, its tensors in safetensors.

Loading executes nothing from the files: node targets resolve only to operators of the namespaces in
``NAMESPACES`` (``torch.ops.<ns>.<op>.<overload>``) or to the fixed table ``PY_FUNCTIONS`` (symbolic-size
arithmetic), and argument values are JSON scalars, node references and tagged dtypes, devices, layouts
and memory formats. The document layout and its version are described in docs/formats.md.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from lowbit.errors import LowbitError

FORMAT = "lowbit.graph"
# 2: lowbit's quantized linear ops may carry a ``residual`` keyword (the residual_add rule). Readers take every
# version up to theirs.
VERSION = 2
NAMESPACES = ("aten", "prims", "lowbit")
PY_FUNCTIONS = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt",
        "ge", "and_", "or_", "not_")},
    **{f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite")},
    "math.ceil": math.ceil, "math.floor": math.floor, "math.sqrt": math.sqrt,
}
# Checks of what the tracer saw (dtype and device metadata, shape guards): not part of the computation, and
# wrong once the program runs in another dtype or on another device.
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}
_TAGS = {torch.dtype: "dtype", torch.layout: "layout", torch.memory_format: "memory_format"}


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The step's position ids: they skip left padding (0 at each row's first real token), as transformers'
    generate does."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    for name, fn in PY_FUNCTIONS.items():
        if fn is target:
            return name
    raise LowbitError(f"the graph calls {getattr(target, '__qualname__', target)!r}, which the lowbit graph format "
                      "cannot store (only aten, prims and lowbit operators and symbolic-size arithmetic)")


def _resolve(name: str):
    if "::" not in name:
        if name not in PY_FUNCTIONS:
            raise LowbitError(f"program calls unknown function '{name}'; it was written by a newer lowbit")
        return PY_FUNCTIONS[name]
    ns, rest = name.split("::", 1)
    op, _, overload = rest.rpartition(".")
    if ns not in NAMESPACES:
        raise LowbitError(f"program calls operator '{name}' outside {', '.join(NAMESPACES)}; refusing to load it")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise LowbitError(f"program calls operator '{name}', which this torch / lowbit does not have; upgrade "
                          "them or recompile") from None


def _encode_value(v):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, (list, tuple)):
        return {"list" if isinstance(v, list) else "tuple": [_encode_value(x) for x in v]}
    if isinstance(v, torch.device):
        return {"device": v.type}
    for cls, tag in _TAGS.items():
        if isinstance(v, cls):
            return {tag: str(v).removeprefix("torch.")}
    raise LowbitError(f"the graph holds an argument of type {type(v).__name__} ({v!r}), which the lowbit graph "
                      "format cannot store")


def _torch_attr(name: str, cls):
    value = getattr(torch, name, None) if re.fullmatch(r"[a-z0-9_]+", name) else None
    if not isinstance(value, cls):
        raise LowbitError(f"program names an unknown {cls.__name__} '{name}'")
    return value


def _decode_value(v, env: dict, device: torch.device, dtype_map: dict):
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "node":
        return env[x]
    if tag in ("list", "tuple"):
        items = [_decode_value(i, env, device, dtype_map) for i in x]
        return items if tag == "list" else tuple(items)
    if tag == "float":
        return float(x)
    if tag == "device":
        return device
    if tag == "dtype":
        d = _torch_attr(x, torch.dtype)
        return dtype_map.get(d, d)
    if tag == "layout":
        return _torch_attr(x, torch.layout)
    if tag == "memory_format":
        return _torch_attr(x, torch.memory_format)
    raise LowbitError(f"program holds a value tagged '{tag}', unknown to this lowbit; upgrade it")


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def encode(gm: fx.GraphModule, dtype: torch.dtype, names: Optional[dict] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors) for ``gm``, whose float tensors and float dtype arguments are ``dtype``; ``names`` maps
    a constant's attribute path to the name it is stored under. Tensors that share storage (tied embeddings)
    are stored once."""
    names = names or {}
    nodes, tensors, stored = [], {}, {}
    for n in gm.graph.nodes:
        if (n.op == "call_module" or (n.op == "call_function" and n.target in _DROPPED)) and not n.users:
            continue
        if n.op == "placeholder":
            nodes.append({"op": "placeholder", "name": n.name})
        elif n.op == "get_attr":
            t = _attr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise LowbitError(f"graph constant {n.target} is a {type(t).__name__}, not a tensor")
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            key = stored.setdefault(ident, names.get(n.target, n.target))
            if key not in tensors:
                tensors[key] = t.detach().contiguous()
            nodes.append({"op": "get_attr", "name": n.name, "tensor": key})
        elif n.op == "call_function":
            nodes.append({"op": "call", "name": n.name, "target": _target_name(n.target),
                          "args": _encode_value(list(n.args)),
                          "kwargs": {k: _encode_value(v) for k, v in n.kwargs.items()}})
        elif n.op == "output":
            nodes.append({"op": "output", "name": n.name, "args": _encode_value(n.args[0])})
        else:
            raise LowbitError(f"graph node {n.name} is a {n.op} ({n.target}); the lowbit graph format stores "
                              "flat graphs of operator calls")
    doc = {"format": FORMAT, "version": VERSION, "dtype": str(dtype).removeprefix("torch."), "nodes": nodes}
    return doc, tensors


def check_document(doc: dict, where: str):
    if doc.get("format") != FORMAT:
        raise LowbitError(f"{where} is not a lowbit program (format {doc.get('format')!r})")
    version = doc.get("version")
    if not (isinstance(version, int) and 1 <= version <= VERSION):
        raise LowbitError(f"{where} is program format version {version}; this lowbit reads versions 1 to "
                          f"{VERSION}: use the lowbit that wrote it, or recompile")


def decode(doc: dict, tensors: dict[str, torch.Tensor], device="cpu", dtype: Optional[torch.dtype] = None,
           where: str = "program") -> fx.GraphModule:
    """The GraphModule of a document on ``device``; with ``dtype``, float tensors and float dtype arguments that
    were the traced dtype become ``dtype``."""
    from lowbit.plugins import ops  # noqa: F401  (registers torch.ops.lowbit.*)

    check_document(doc, where)
    device = torch.device(device)
    traced = _torch_attr(doc["dtype"], torch.dtype)
    dtype_map = {traced: dtype} if dtype is not None and dtype != traced else {}
    root = torch.nn.Module()
    names: dict[str, str] = {}
    for i, (key, t) in enumerate(tensors.items()):
        names[key] = f"c{i}_" + re.sub(r"\W", "_", key)[-60:]
        root.register_buffer(names[key], t.to(device=device, dtype=dtype_map.get(t.dtype, t.dtype)))
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for nd in doc["nodes"]:
        op = nd["op"]
        if op == "placeholder":
            env[nd["name"]] = g.placeholder(nd["name"])
        elif op == "get_attr":
            if nd["tensor"] not in names:
                raise LowbitError(f"{where}: node {nd['name']} reads tensor {nd['tensor']}, which the tensors file "
                                  "lacks; recompile")
            env[nd["name"]] = g.get_attr(names[nd["tensor"]])
        elif op == "call":
            args = _decode_value({"tuple": nd["args"]["list"]}, env, device, dtype_map)
            kwargs = {k: _decode_value(v, env, device, dtype_map) for k, v in nd["kwargs"].items()}
            env[nd["name"]] = g.call_function(_resolve(nd["target"]), args, kwargs)
        elif op == "output":
            g.output(_decode_value(nd["args"], env, device, dtype_map))
        else:
            raise LowbitError(f"{where}: node kind '{op}' is unknown to this lowbit; upgrade it")
    return fx.GraphModule(root, g)
