"""The shipped program written as ONNX directly: each fx node of the lowered program (``aten`` ops, symbolic-size
arithmetic and the ``lowbit::ort_*`` ops) becomes one ONNX node or a few, with no re-trace.

``torch.onnx.export`` re-traces the program twice (``torch.export``, then its decompositions) before it
translates a node; on the demo LM that is most of a minute. The program is an exported graph already, so it is
translated as it stands: dtypes and shapes come from three runs on meta tensors at different sizes (a dimension
that differs between them is dynamic), sizes read from inputs (``sym_size``) become ``Shape`` slices, and the
lowbit ops use the translations ``torch.onnx`` uses too (``lowering.onnx.translations``). A node whose inputs are all
constants and whose result is small is computed here, in torch, and stored as an initializer.

An op this emitter does not know raises ``Unsupported``; the caller then exports with ``torch.onnx`` instead.

Size: one module over the ~600-line bar on purpose: it is a table of small per-operator emitters around one
shape/dtype inference and one constant folder, each emitter a few lines; split by operator family it would
scatter the shared helpers every emitter calls.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from lowbit.lowering.deferred import Deferred, materialized
from lowbit.lowering.onnx.deferred_tensor import DeferredTensor

INT64_MAX = 2 ** 63 - 1
# Results computed at export time up to this size become initializers; larger ones (a reshape of a weight) stay
# ops on the initializer so the file does not hold the bytes twice.
FOLD_BYTES = 64 * 1024
MULTI_OUTPUT = {"LayerNormalization": 3}
aten = torch.ops.aten


class Unsupported(Exception):
    """The program holds an op (or an op's form) the emitter does not translate."""


DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16,
          torch.float64: ir.DataType.DOUBLE, torch.int64: ir.DataType.INT64, torch.int32: ir.DataType.INT32,
          torch.int16: ir.DataType.INT16, torch.int8: ir.DataType.INT8, torch.uint8: ir.DataType.UINT8,
          torch.bool: ir.DataType.BOOL}


def _dtype(dtype: torch.dtype):
    try:
        return DTYPES[dtype]
    except KeyError:
        raise Unsupported(f"dtype {dtype}") from None


def _tensors(val) -> list:
    return list(val) if isinstance(val, (tuple, list)) else [val]


def propagate(gm: torch.fx.GraphModule, runs: list[tuple]) -> dict:
    """{node: [(dtype, shape) per output] or "sym"} from runs of the program on example arguments of different
    sizes, on the meta device (shapes and dtypes only; fake tensors where an op has no meta kernel): a dimension the
    runs agree on is an int, one they disagree on is named by its sizes in the runs (``"3_5_9"``), so equal dynamic
    dimensions carry equal names (rules that check two shapes match need that)."""
    try:
        seen = [_MetaRun(gm).values(args) for args in runs]
    except Exception:                    # noqa: BLE001  (an op without a meta kernel raises its own error type)
        seen = [_fake_values(gm, args) for args in runs]
    types = {}
    for node in gm.graph.nodes:
        vals = [s[node] for s in seen]
        if isinstance(vals[0], (int, torch.SymInt, bool)):
            types[node] = "sym"
        elif isinstance(vals[0], (torch.Tensor, tuple, list)):
            outs = []
            for parts in zip(*(_tensors(v) for v in vals)):
                if not isinstance(parts[0], torch.Tensor) or len({len(p.shape) for p in parts}) != 1:
                    outs.append(None)
                    continue
                outs.append((parts[0].dtype, [dim_name([p.shape[i] for p in parts])
                                              for i in range(len(parts[0].shape))]))
            types[node] = outs
    return types


class _MetaRun(torch.fx.Interpreter):
    """The program on meta tensors: weights and inputs as meta, every device argument made meta."""
    META = torch.device("meta")

    def values(self, args) -> dict:
        self.seen = {}
        with torch.no_grad():
            self.run(*[a.to(self.META) for a in args])
        return self.seen

    def run_node(self, n):
        self.seen[n] = out = super().run_node(n)
        return out

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.META)

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:
            kwargs = {**kwargs, "device": self.META}
        if target == aten.to.device:
            args = (args[0], self.META, *args[2:])
        return super().call_function(target, args, kwargs)


def _fake_values(gm: torch.fx.GraphModule, args) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[mode.from_tensor(a) for a in args])
    return {n: n.meta.get("val") for n in gm.graph.nodes}


def dim_name(sizes: list[int]):
    """A dimension's sizes in the example runs -> the size, when static, or its name."""
    return int(sizes[0]) if len(set(sizes)) == 1 else "_".join(str(int(d)) for d in sizes)


class _Opset:
    """``op.Mul(a, b, attr=v)`` appends a node to the emitter; ``op.Constant(...)`` gives an initializer."""

    def __init__(self, emitter: "Emitter", domain: str):
        self._e, self._domain = emitter, domain

    def __getattr__(self, op_type: str) -> Callable:
        if op_type == "Constant":
            return self._e.constant_attr
        return lambda *inputs, **attrs: self._e.op(op_type, *inputs, domain=self._domain, **attrs)


class Emitter:
    """One program's ONNX graph, built node by node (``emit``)."""

    def __init__(self, gm: torch.fx.GraphModule, types: dict, opset: int, handlers: dict | None = None,
                 domains: dict | None = None):
        from lowbit.lowering.onnx.ort_ops import CONTRIB_DOMAIN, register_contrib_schemas
        from lowbit.lowering.onnx.translations import lowbit_op_functions

        register_contrib_schemas()
        self.gm, self.types, self.opset = gm, types, opset
        self.handlers = handlers or {}          # a target's own forms of ops, before the shared table
        self.domains = {CONTRIB_DOMAIN: 1} if domains is None else domains
        self.nodes: list = []
        self.initializers: dict = {}            # name -> ir.Value
        self.values: dict = {}                  # fx node -> ir.Value or tuple of them
        self.consts: dict = {}                  # fx node -> (torch tensor, initializer name)
        self._small: dict = {}                  # (dtype, shape, bytes) -> initializer, small constants shared
        self._scalars: dict = {}                # sym node -> its value as a 0-d int64
        self.onnx = _Opset(self, "")          # the opset object translations written against onnxscript's take
        self.lowbit = lowbit_op_functions(self.onnx, _Opset(self, CONTRIB_DOMAIN))
        self.contrib = CONTRIB_DOMAIN

    # -- building blocks ----------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, domain: str = "", outputs: int | None = None, **attrs):
        """Append a node; its output, or a tuple of ``outputs`` of them."""
        while inputs and inputs[-1] is None:        # trailing optional inputs left out
            inputs = inputs[:-1]
        n = outputs or (attrs.get("num_outputs") if op_type == "Split" else MULTI_OUTPUT.get(op_type, 1))
        node = ir.Node(domain, op_type, list(inputs),
                       ir.convenience.convert_attributes({k: v for k, v in attrs.items() if v is not None}),
                       num_outputs=n)
        self.nodes.append(node)
        return node.outputs[0] if n == 1 else tuple(node.outputs)

    def const(self, value, dtype: torch.dtype | None = None, name: str | None = None):
        """An initializer holding ``value`` (a torch tensor, a ``Deferred`` one or a Python number), named ``name``
        or, unnamed, shared with every other unnamed constant of the same small value."""
        if isinstance(value, Deferred):
            return self._deferred(value if dtype is None else value.to(dtype), name)
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        t = t.detach().contiguous()
        key = None
        if name is None:
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t          # numpy has no bfloat16
            key = (t.dtype, tuple(t.shape), raw.numpy().tobytes()) if t.numel() <= 64 else None
            if key in self._small:
                return self._small[key]
            name = f"const_{len(self.initializers)}"
        elif name in self.initializers:
            return self.initializers[name]
        array = t.numpy() if t.dtype != torch.bfloat16 else t
        v = ir.Value(name=name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(_dtype(t.dtype)),
                     const_value=ir.tensor(array, name=name))
        self.initializers[name] = v
        if key is not None:
            self._small[key] = v
        return v

    def _deferred(self, value: Deferred, name: str) -> "ir.Value":
        """An initializer read when the model is written (``deferred_tensor``)."""
        if name in self.initializers:
            return self.initializers[name]
        return self.initializer(name, DeferredTensor(value, _dtype(value.dtype), name))

    def initializer(self, name: str, tensor) -> "ir.Value":
        """An initializer holding an ``onnx_ir`` tensor (for types torch has no dtype for, such as INT4)."""
        v = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
        self.initializers[name] = v
        return v

    def constant_attr(self, value=None, value_float=None, value_ints=None, value_int=None, value_floats=None):
        """onnxscript's ``op.Constant`` signature, as an initializer."""
        from onnx import numpy_helper

        if value is not None:
            return self.const(torch.from_numpy(numpy_helper.to_array(value).copy()))
        if value_float is not None:
            return self.const(float(value_float), torch.float32)
        if value_int is not None:
            return self.const(int(value_int), torch.int64)
        if value_ints is not None:
            return self.const(list(value_ints), torch.int64)
        return self.const(list(value_floats), torch.float32)

    def out_type(self, node, i: int = 0):
        t = self.types.get(node)
        if not isinstance(t, list) or t[i] is None:
            raise Unsupported(f"no type for {node.name}")
        return t[i]

    def dtype(self, node) -> torch.dtype:
        return self.out_type(node)[0]

    def rank(self, node) -> int:
        return len(self.out_type(node)[1])

    def is_sym(self, x) -> bool:
        return isinstance(x, torch.fx.Node) and self.types.get(x) == "sym"

    def v(self, x):
        """The ONNX value of an fx node (a constant becomes its initializer on first use)."""
        if x in self.consts:
            t, name = self.consts[x]
            return self.const(t, name=name)
        if x not in self.values:
            raise Unsupported(f"{x.name} is used before it is computed")
        return self.values[x]

    def scalar(self, x):
        """A symbolic size as a 0-d int64."""
        if x not in self._scalars:
            self._scalars[x] = self.op("Squeeze", self.v(x), self.const([0], torch.int64))
        return self._scalars[x]

    def tensor(self, x, dtype: torch.dtype):
        """An argument as a tensor of ``dtype``: a node (cast if it differs), a size, or a Python number."""
        if isinstance(x, torch.fx.Node):
            if self.is_sym(x):
                s = self.scalar(x)
                return s if dtype == torch.int64 else self.op("Cast", s, to=int(_dtype(dtype)))
            return self.cast(self.v(x), self.dtype(x), dtype)
        if isinstance(x, (bool, int, float)):
            return self.const(x, dtype)
        raise Unsupported(f"argument {x!r}")

    def cast(self, value, have: torch.dtype, want: torch.dtype):
        return value if have == want else self.op("Cast", value, to=int(_dtype(want)))

    def sizes(self, items, minus_one_as_one: bool = False):
        """A list of ints and symbolic sizes as a 1-d int64 tensor."""
        pieces, run = [], []
        for x in items:
            if isinstance(x, torch.fx.Node):
                if run:
                    pieces.append(self.const(run, torch.int64))
                    run = []
                pieces.append(self.v(x))
            else:
                run.append(1 if minus_one_as_one and x == -1 else int(x))
        if run or not pieces:
            pieces.append(self.const(run, torch.int64))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", *pieces, axis=0)

    # -- the walk -----------------------------------------------------------------------------------------------
    def emit(self, input_values: list, output_names: list[str]):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(input_values):
            raise Unsupported(f"{len(placeholders)} graph inputs, {len(input_values)} names")
        for node, value in zip(placeholders, input_values):
            self.values[node] = value
        outputs = None
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                self.consts[node] = (getattr(self.gm, node.target), node.target)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                outputs = [self.v(x) for x in torch.utils._pytree.tree_leaves(node.args[0])]
            elif node.op != "placeholder":
                raise Unsupported(f"fx node kind {node.op}")
        taken = {id(v) for v in input_values}
        final = []
        for value, name in zip(outputs, output_names):
            if id(value) in taken or value.const_value is not None:
                value = self.op("Identity", value)
            taken.add(id(value))
            value.name = name
            final.append(value)
        graph = ir.Graph(input_values, final, nodes=self.nodes, initializers=list(self.initializers.values()),
                         opset_imports={"": self.opset, **self.domains}, name="main_graph")
        return ir.Model(graph, ir_version=10, producer_name="lowbit")

    def _call(self, node):
        target = node.target
        handler = self.handlers.get(target) or HANDLERS.get(target)
        if handler is None and target in self.lowbit:
            handler = _lowbit_op
        if handler is None:
            raise Unsupported(f"op {getattr(target, '__name__', target)}")
        if target in IDENTITY and node.args[0] in self.consts and self._same_dtype(node):
            self.consts[node] = self.consts[node.args[0]]
            return
        if self._fold(node):
            return
        result = handler(self, node)
        self.values[node] = result
        if self.types.get(node) == "sym":
            return
        for i, value in enumerate(_tensors(result)):
            t = self.types[node][i] if isinstance(self.types.get(node), list) else None
            if t is None or value.producer() is None or value.name:
                continue
            value.dtype = _dtype(t[0])
            value.shape = ir.Shape(t[1])
            value.name = node.name if len(_tensors(result)) == 1 else f"{node.name}_{i}"

    def shared_weight(self, node) -> bool:
        """Whether more than one node reads ``node``'s tensor: counting every get_attr of it and every identity op
        of those (``aliases``), whose own reads of one another are not readers."""
        name = self.consts[node][1]
        aliases = [n for n, (_, other) in self.consts.items() if other == name]
        return sum(len(n.users) for n in aliases) - (len(aliases) - 1) > 1

    def _same_dtype(self, node) -> bool:
        return self.dtype(node) == self.consts[node.args[0]][0].dtype

    def _fold(self, node) -> bool:
        """Compute a node whose tensor inputs are all constants now, when its result is small."""
        if not isinstance(node.target, torch._ops.OpOverload) or node.target.namespace != "aten":
            return False
        inputs = node.all_input_nodes
        if not inputs or any(n not in self.consts for n in inputs):
            return False
        # A weight another node reads stays one initializer: folding a reshape of it would store its bytes twice.
        if any(self.shared_weight(n) for n in inputs):
            return False
        t = self.types.get(node)
        if not isinstance(t, list) or len(t) != 1 or t[0] is None or any(isinstance(d, str) for d in t[0][1]):
            return False
        dtype, shape = t[0]
        if int(np.prod(shape)) * dtype.itemsize > FOLD_BYTES:
            return False
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: materialized(self.consts[n][0]))
        with torch.no_grad():
            out = node.target(*args, **kwargs)
        self.consts[node] = (out.detach().clone(), f"folded_{node.name}")
        return True


# -- handlers: (emitter, fx node) -> ONNX value(s) -----------------------------------------------------------------
def _identity(e: Emitter, node):
    x = node.args[0]
    want = e.dtype(node)
    return e.cast(e.v(x), e.dtype(x), want)


def _unary(op_type: str):
    return lambda e, node: e.op(op_type, e.tensor(node.args[0], e.dtype(node)))


def _promote(e: Emitter, a, b) -> torch.dtype:
    def kind(x):
        if isinstance(x, torch.fx.Node):
            return torch.int64 if e.is_sym(x) else e.dtype(x)
        return {bool: torch.bool, int: torch.int64, float: torch.float32}[type(x)]

    ka, kb = kind(a), kind(b)
    tensor_a = isinstance(a, torch.fx.Node) and not e.is_sym(a)
    tensor_b = isinstance(b, torch.fx.Node) and not e.is_sym(b)
    if tensor_a and not tensor_b:
        return ka if (ka.is_floating_point or not kb.is_floating_point) else torch.get_default_dtype()
    if tensor_b and not tensor_a:
        return kb if (kb.is_floating_point or not ka.is_floating_point) else torch.get_default_dtype()
    return torch.promote_types(ka, kb)


def _binary(op_type: str, compare: bool = False):
    def handler(e: Emitter, node):
        a, b = node.args[:2]
        alpha = node.kwargs.get("alpha", 1)
        dtype = _promote(e, a, b) if compare else e.dtype(node)
        if not compare and isinstance(b, (int, float)) and not isinstance(b, bool) and alpha == 1 and \
                isinstance(a, torch.fx.Node) and e.dtype(a) == dtype and \
                ((op_type in ("Add", "Sub") and b == 0) or (op_type in ("Mul", "Div") and b == 1)):
            return e.v(a)
        vb = e.tensor(b, dtype)
        if alpha != 1:
            vb = e.op("Mul", vb, e.const(alpha, dtype))
        return e.op(op_type, e.tensor(a, dtype), vb)
    return handler


def _rsub(e: Emitter, node):
    a, b = node.args[:2]
    dtype = e.dtype(node)
    va = e.tensor(a, dtype)
    if node.kwargs.get("alpha", 1) != 1:
        va = e.op("Mul", va, e.const(node.kwargs["alpha"], dtype))
    return e.op("Sub", e.tensor(b, dtype), va)


def _div_mode(e: Emitter, node):
    mode = node.kwargs.get("rounding_mode")
    dtype = e.dtype(node)
    if mode is None:
        return _binary("Div")(e, node)
    if mode != "floor" or not dtype.is_floating_point:
        raise Unsupported(f"div with rounding_mode={mode} on {dtype}")
    return e.op("Floor", e.op("Div", e.tensor(node.args[0], dtype), e.tensor(node.args[1], dtype)))


def _ne(e: Emitter, node):
    return e.op("Not", _binary("Equal", compare=True)(e, node))


def _logical(op_type_bool: str, op_type_int: str):
    def handler(e: Emitter, node):
        dtype = e.dtype(node)
        a, b = (e.tensor(x, dtype) for x in node.args[:2])
        return e.op(op_type_bool if dtype == torch.bool else op_type_int, a, b)
    return handler


def _not(e: Emitter, node):
    if e.dtype(node) != torch.bool:
        return e.op("BitwiseNot", e.v(node.args[0]))
    return e.op("Not", e.tensor(node.args[0], torch.bool))


def _rsqrt(e: Emitter, node):
    return e.op("Reciprocal", e.op("Sqrt", e.tensor(node.args[0], e.dtype(node))))


def _silu(e: Emitter, node):
    x = e.tensor(node.args[0], e.dtype(node))
    return e.op("Mul", x, e.op("Sigmoid", x))


def _gelu(e: Emitter, node):
    """Written in the forms onnxscript's Gelu / FastGelu rules match."""
    dtype = e.dtype(node)
    x = e.tensor(node.args[0], dtype)
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")

    def c(v):
        return e.const(v, dtype)

    if approximate == "tanh":
        inner = e.op("Add", x, e.op("Mul", c(0.044715), e.op("Pow", x, c(3.0))))
        t = e.op("Add", e.op("Tanh", e.op("Mul", c(math.sqrt(2.0 / math.pi)), inner)), c(1.0))
        return e.op("Mul", x, e.op("Mul", c(0.5), t))
    return e.op("Mul", c(0.5), e.op("Mul", x, e.op("Add", e.op("Erf", e.op("Div", x, c(math.sqrt(2.0)))), c(1.0))))


def _pow(e: Emitter, node):
    dtype = e.dtype(node)
    return e.op("Pow", e.tensor(node.args[0], dtype), e.tensor(node.args[1], dtype))


def _clamp(e: Emitter, node):
    dtype = e.dtype(node)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if node.target == aten.clamp_max.default:
        lo, hi = None, node.args[1]
    return e.op("Clip", e.tensor(node.args[0], dtype), None if lo is None else e.tensor(lo, dtype),
                None if hi is None else e.tensor(hi, dtype))


def _where(e: Emitter, node):
    dtype = e.dtype(node)
    c, a, b = node.args[:3]
    return e.op("Where", e.tensor(c, torch.bool), e.tensor(a, dtype), e.tensor(b, dtype))


def _masked_fill(e: Emitter, node):
    dtype = e.dtype(node)
    x, mask, value = node.args[:3]
    return e.op("Where", e.tensor(mask, torch.bool), e.tensor(value, dtype), e.tensor(x, dtype))


def _reduce(op_type: str):
    def handler(e: Emitter, node):
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dtype = e.dtype(node)
        if dims is None or dims == []:
            dims = list(range(e.rank(x)))
        dims = [dims] if isinstance(dims, int) else list(dims)
        return e.op(op_type, e.tensor(x, dtype), e.const(dims, torch.int64), keepdims=int(bool(keep)),
                    noop_with_empty_axes=0)
    return handler


def _softmax(e: Emitter, node):
    return e.op("Softmax", e.tensor(node.args[0], e.dtype(node)), axis=int(node.args[1]))


def _reshape(e: Emitter, node):
    shape = list(node.args[1])
    literal_zero = any(isinstance(d, int) and d == 0 for d in shape)
    return e.op("Reshape", e.v(node.args[0]), e.sizes(shape), allowzero=1 if literal_zero else None)


def _transpose(e: Emitter, node):
    rank = e.rank(node)
    a, b = (d % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return e.op("Transpose", e.v(node.args[0]), perm=perm)


def _permute(e: Emitter, node):
    rank = e.rank(node)
    return e.op("Transpose", e.v(node.args[0]), perm=[d % rank for d in node.args[1]])


def _t(e: Emitter, node):
    return e.op("Transpose", e.v(node.args[0]), perm=[1, 0]) if e.rank(node) == 2 else e.v(node.args[0])


def _unsqueeze(e: Emitter, node):
    return e.op("Unsqueeze", e.v(node.args[0]), e.const([node.args[1] % e.rank(node)], torch.int64))


def _squeeze(e: Emitter, node):
    x = node.args[0]
    rank = e.rank(x)
    dims = node.args[1] if len(node.args) > 1 else None
    shape = e.out_type(x)[1]
    if dims is None:
        dims = [i for i, d in enumerate(shape) if d == 1]
    dims = [d % rank for d in ([dims] if isinstance(dims, int) else dims)]
    dims = [d for d in dims if shape[d] == 1]            # torch leaves a dimension that is not 1
    if any(not isinstance(shape[d], int) for d in dims):
        raise Unsupported("squeeze of a dynamic dimension")
    return e.op("Squeeze", e.v(x), e.const(dims, torch.int64)) if dims else e.v(x)


def _expand(e: Emitter, node):
    return e.op("Expand", e.v(node.args[0]), e.sizes(list(node.args[1]), minus_one_as_one=True))


def _slice(e: Emitter, node):
    x = node.args[0]
    args = list(node.args[1:]) + [None] * (4 - len(node.args[1:]))
    dim, start, end, step = (node.kwargs.get(k, a) for k, a in zip(("dim", "start", "end", "step"), args))
    dim, start, step = dim or 0, 0 if start is None else start, 1 if step is None else step
    end = INT64_MAX if end is None else end
    if isinstance(start, int) and start == 0 and step == 1 and isinstance(end, int) and end >= 2 ** 62:
        return e.v(x)
    return e.op("Slice", e.v(x), e.sizes([start]), e.sizes([min(end, INT64_MAX) if isinstance(end, int) else end]),
                e.const([dim], torch.int64), e.const([step], torch.int64))


def _select(e: Emitter, node):
    x, dim, index = node.args[:3]
    return e.op("Gather", e.v(x), e.tensor(index, torch.int64), axis=int(dim))


def _cat(e: Emitter, node):
    dtype = e.dtype(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return e.op("Concat", *[e.tensor(t, dtype) for t in node.args[0]], axis=int(dim))


def _split_with_sizes(e: Emitter, node):
    x, sizes = node.args[:2]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if any(not isinstance(s, int) for s in sizes):
        raise Unsupported("split at symbolic sizes")
    return e.op("Split", e.v(x), e.const(list(sizes), torch.int64), axis=int(dim), outputs=len(sizes))


def _split_equal(chunks: bool):
    """``split(x, size, dim)``, or ``chunk(x, n, dim)`` (pieces of ceil(size / n)): Split at static sizes."""
    def handler(e: Emitter, node):
        x, n = node.args[:2]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        total = e.out_type(x)[1][dim]
        if not isinstance(total, int) or not isinstance(n, int):
            raise Unsupported(f"{node.target} of a dynamic dimension")
        size = -(-total // n) if chunks else n
        sizes = [min(size, total - i) for i in range(0, total, size)]
        return e.op("Split", e.v(x), e.const(sizes, torch.int64), axis=int(dim), outputs=len(sizes))
    return handler


def _repeat_interleave(e: Emitter, node):
    """x.repeat_interleave(r, dim): each slice along ``dim`` r times in a row (Unsqueeze, Expand, Reshape)."""
    x, repeats = node.args[:2]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None or not isinstance(repeats, int):
        raise Unsupported("repeat_interleave without a dim or with tensor repeats")
    shape = e.out_type(x)[1]
    dim = dim % len(shape)
    head = e.op("Shape", e.v(x), start=0, end=dim + 1)
    tail = e.op("Shape", e.v(x), start=dim + 1)
    wide = e.op("Expand", e.op("Unsqueeze", e.v(x), e.const([dim + 1], torch.int64)),
                e.op("Concat", head, e.const([repeats], torch.int64), tail, axis=0))
    return e.op("Reshape", wide, e.op("Concat", e.op("Shape", e.v(x), start=0, end=dim), e.const([-1], torch.int64),
                                      tail, axis=0))


def _sdpa(e: Emitter, node):
    from lowbit.lowering.onnx.translations import scaled_dot_product

    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p", 0.0) or a.get("is_causal", False):
        raise Unsupported("scaled_dot_product_attention with dropout or is_causal")
    q, k = e.out_type(a["query"])[1], e.out_type(a["key"])[1]
    if len(q) != 4 or not all(isinstance(d, int) for d in (q[1], q[-1], k[1])):
        raise Unsupported("scaled_dot_product_attention with dynamic head counts or sizes")
    if k[1] in (1, q[1]):
        groups = 1                          # the same heads, or one K / V head broadcast to all
    elif a.get("enable_gqa", False) and q[1] % k[1] == 0:
        groups = q[1] // k[1]
    else:
        raise Unsupported(f"scaled_dot_product_attention of {q[1]} query heads on {k[1]} key heads")
    scale = a.get("scale") or 1.0 / math.sqrt(q[-1])
    mask = a.get("attn_mask")
    return scaled_dot_product(e.onnx, e.v(a["query"]), e.v(a["key"]), e.v(a["value"]),
                              None if mask is None else e.v(mask), scale, groups)


def _gather(e: Emitter, node):
    x, dim, idx = node.args[:3]
    return e.op("GatherElements", e.v(x), e.tensor(idx, torch.int64), axis=int(dim))


def _numpy_t(e: Emitter, node):
    return e.op("Transpose", e.v(node.args[0]), perm=list(range(e.rank(node)))[::-1])


def _stack(e: Emitter, node):
    dtype = e.dtype(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    axis = e.const([dim % e.rank(node)], torch.int64)
    return e.op("Concat", *[e.op("Unsqueeze", e.tensor(t, dtype), axis) for t in node.args[0]],
                axis=dim % e.rank(node))


def _flatten(e: Emitter, node):
    x = node.args[0]
    rank = e.rank(x)
    start = (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)) % max(rank, 1)
    end = (node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)) % max(rank, 1)
    pieces = [e.op("Shape", e.v(x), start=0, end=start)] if start else []
    pieces.append(e.const([-1], torch.int64))
    if end + 1 < rank:
        pieces.append(e.op("Shape", e.v(x), start=end + 1))
    return e.op("Reshape", e.v(x), pieces[0] if len(pieces) == 1 else e.op("Concat", *pieces, axis=0))


VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
         aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
         aten.expand.default, aten.slice.Tensor, aten.select.int, aten.split_with_sizes.default,
         aten.split.Tensor, aten.chunk.default, aten.alias.default, aten.numpy_T.default, aten.flatten.using_ints,
         operator.getitem}


def _in_place(handler):
    """``x.add_(y)`` and the like: the out-of-place op, whose result later readers of ``x`` then read. Refused
    when ``x`` may share memory with another tensor (a view, an input, a weight), which would change too."""
    def wrapped(e: Emitter, node):
        x = node.args[0]
        if not isinstance(x, torch.fx.Node) or x.op != "call_function" or x.target in VIEWS or x in e.consts:
            raise Unsupported(f"{node.target} on a tensor that may share memory with another")
        result = handler(e, node)
        e.values[x] = result
        return result
    return wrapped


def _getitem(e: Emitter, node):
    src, i = node.args
    value = e.values.get(src)
    if not isinstance(value, tuple):
        raise Unsupported(f"getitem on {src.name}")
    return value[i]


def _index(e: Emitter, node):
    """x[i0, i1, ...]: the index tensors broadcast together and index leading dimensions (GatherND), or one index
    tensor on any dimension (Gather)."""
    x, indices = node.args[:2]
    present = [i for i, t in enumerate(indices) if t is not None]
    if len(present) == 1:
        return e.op("Gather", e.v(x), e.tensor(indices[present[0]], torch.int64), axis=present[0])
    if present != list(range(len(present))):
        raise Unsupported("index with index tensors after a None")
    idx = [e.tensor(t, torch.int64) for t in indices]
    total = idx[0]
    for t in idx[1:]:
        total = e.op("Add", total, t)                   # only its shape is read: the indices' broadcast shape
    shape = e.op("Shape", total)
    stacked = e.op("Concat", *[e.op("Unsqueeze", e.op("Expand", t, shape), e.const([-1], torch.int64))
                               for t in idx], axis=-1)
    return e.op("GatherND", e.v(x), stacked)


def _index_select(e: Emitter, node):
    x, dim, idx = node.args[:3]
    return e.op("Gather", e.v(x), e.tensor(idx, torch.int64), axis=int(dim))


def _embedding(e: Emitter, node):
    w, ids = node.args[:2]
    return e.op("Gather", e.v(w), e.tensor(ids, torch.int64), axis=0)


def _arange(e: Emitter, node):
    dtype = e.dtype(node)
    args = list(node.args)
    start, end, step = (0, args[0], 1) if node.target == aten.arange.default else \
        (args[0], args[1], args[2] if len(args) > 2 else node.kwargs.get("step", 1))
    return e.op("Range", e.tensor(start, dtype), e.tensor(end, dtype), e.tensor(step, dtype))


def _filled(value_of: Callable, size_of: Callable):
    def handler(e: Emitter, node):
        dtype = e.dtype(node)
        fill = e.const(value_of(node), dtype)
        size = size_of(e, node)
        return fill if size is None else e.op("Expand", fill, size)
    return handler


def _size_arg(i: int):
    def size(e: Emitter, node):
        items = list(node.args[i])
        return e.sizes(items) if items else None
    return size


def _like(e: Emitter, node):
    return e.op("Shape", e.v(node.args[0]))


def _linear(e: Emitter, node):
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    dtype = e.dtype(node)
    if w in e.consts and not e.shared_weight(w):
        weight = e.const(e.consts[w][0].t(), name=f"{e.consts[w][1]}_t")      # [K, N], read by this matmul only
    else:
        weight = e.op("Transpose", e.tensor(w, dtype), perm=[1, 0])
    y = e.op("MatMul", e.tensor(x, dtype), weight)
    return y if b is None else e.op("Add", y, e.tensor(b, dtype))


def _matmul(e: Emitter, node):
    dtype = e.dtype(node)
    return e.op("MatMul", *(e.tensor(t, dtype) for t in node.args[:2]))


def _addmm(e: Emitter, node):
    dtype = e.dtype(node)
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    bias, a, b = (e.tensor(t, dtype) for t in node.args[:3])
    y = e.op("MatMul", a, b)
    if alpha != 1:
        y = e.op("Mul", y, e.const(alpha, dtype))
    if beta != 1:
        bias = e.op("Mul", bias, e.const(beta, dtype))
    return e.op("Add", bias, y) if beta != 0 else y


def _layer_norm(e: Emitter, node):
    x, shape = node.args[:2]
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    dtype = e.dtype(node)
    weight = e.tensor(w, dtype) if w is not None else e.const(torch.ones(list(shape), dtype=dtype))
    y, _, _ = e.op("LayerNormalization", e.tensor(x, dtype), weight, None if b is None else e.tensor(b, dtype),
                   axis=-len(shape), epsilon=float(eps))
    return y


def _cumsum(e: Emitter, node):
    dtype = e.dtype(node)
    return e.op("CumSum", e.tensor(node.args[0], dtype), e.const(int(node.args[1]), torch.int64))


def _trilu(upper: int):
    def handler(e: Emitter, node):
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        return e.op("Trilu", e.v(node.args[0]), e.const(int(k), torch.int64), upper=upper)
    return handler


def _sym_size(e: Emitter, node):
    x, d = node.args
    d = d % e.rank(x)
    return e.op("Shape", e.v(x), start=d, end=d + 1)


def _sym_binary(op_type: str):
    def handler(e: Emitter, node):
        a, b = (e.v(x) if isinstance(x, torch.fx.Node) else e.const([int(x)], torch.int64) for x in node.args)
        return e.op(op_type, a, b)
    return handler


def _lowbit_op(e: Emitter, node):
    def arg(x):
        if isinstance(x, torch.fx.Node):
            return e.v(x)
        return x

    if node.kwargs.get("residual") is not None:
        raise Unsupported(f"{node.target} with a residual epilogue")
    return e.lowbit[node.target](*[arg(a) for a in node.args])


IDENTITY = {aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default, aten.clone.default,
            aten.alias.default, aten.contiguous.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
            aten._to_copy.default, aten.dropout.default, aten.type_as.default}
HANDLERS = {
    **{op: _identity for op in IDENTITY},
    aten.add.Tensor: _binary("Add"), aten.add.Scalar: _binary("Add"), aten.sub.Tensor: _binary("Sub"),
    aten.sub.Scalar: _binary("Sub"), aten.mul.Tensor: _binary("Mul"), aten.mul.Scalar: _binary("Mul"),
    aten.div.Tensor: _binary("Div"), aten.div.Scalar: _binary("Div"), aten.div.Tensor_mode: _div_mode,
    aten.rsub.Scalar: _rsub, aten.rsub.Tensor: _rsub,
    aten.maximum.default: _binary("Max"), aten.minimum.default: _binary("Min"),
    aten.pow.Tensor_Scalar: _pow, aten.pow.Tensor_Tensor: _pow,
    aten.eq.Tensor: _binary("Equal", True), aten.eq.Scalar: _binary("Equal", True),
    aten.ne.Tensor: _ne, aten.ne.Scalar: _ne,
    aten.lt.Tensor: _binary("Less", True), aten.lt.Scalar: _binary("Less", True),
    aten.le.Tensor: _binary("LessOrEqual", True), aten.le.Scalar: _binary("LessOrEqual", True),
    aten.gt.Tensor: _binary("Greater", True), aten.gt.Scalar: _binary("Greater", True),
    aten.ge.Tensor: _binary("GreaterOrEqual", True), aten.ge.Scalar: _binary("GreaterOrEqual", True),
    aten.__and__.Tensor: _logical("And", "BitwiseAnd"), aten.bitwise_and.Tensor: _logical("And", "BitwiseAnd"),
    aten.logical_and.default: _logical("And", "And"),
    aten.__or__.Tensor: _logical("Or", "BitwiseOr"), aten.bitwise_or.Tensor: _logical("Or", "BitwiseOr"),
    aten.logical_or.default: _logical("Or", "Or"),
    aten.bitwise_not.default: _not, aten.logical_not.default: _not,
    aten.neg.default: _unary("Neg"), aten.cos.default: _unary("Cos"), aten.sin.default: _unary("Sin"),
    aten.exp.default: _unary("Exp"), aten.log.default: _unary("Log"), aten.sqrt.default: _unary("Sqrt"),
    aten.tanh.default: _unary("Tanh"), aten.sigmoid.default: _unary("Sigmoid"), aten.erf.default: _unary("Erf"),
    aten.abs.default: _unary("Abs"), aten.relu.default: _unary("Relu"), aten.reciprocal.default: _unary("Reciprocal"),
    aten.floor.default: _unary("Floor"), aten.ceil.default: _unary("Ceil"),
    aten.rsqrt.default: _rsqrt, aten.silu.default: _silu, aten.gelu.default: _gelu,
    aten.clamp.default: _clamp, aten.clamp_min.default: _clamp, aten.clamp_max.default: _clamp,
    aten.where.self: _where, aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.mean.dim: _reduce("ReduceMean"), aten.sum.dim_IntList: _reduce("ReduceSum"),
    aten.amax.default: _reduce("ReduceMax"),
    aten.softmax.int: _softmax, aten._softmax.default: _softmax,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.transpose.int: _transpose, aten.permute.default: _permute, aten.t.default: _t,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze, aten.expand.default: _expand,
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.cat.default: _cat,
    aten.split_with_sizes.default: _split_with_sizes, aten.split.Tensor: _split_equal(False),
    aten.chunk.default: _split_equal(True),
    aten.repeat_interleave.self_int: _repeat_interleave, aten.scaled_dot_product_attention.default: _sdpa,
    aten.gather.default: _gather, aten.numpy_T.default: _numpy_t,
    aten.where.ScalarOther: _where, aten.where.ScalarSelf: _where, aten.where.Scalar: _where,
    aten.index.Tensor: _index, aten.index_select.default: _index_select, aten.embedding.default: _embedding,
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.new_ones.default: _filled(lambda n: 1, _size_arg(1)),
    aten.new_zeros.default: _filled(lambda n: 0, _size_arg(1)),
    aten.new_full.default: _filled(lambda n: n.args[2], _size_arg(1)),
    aten.ones.default: _filled(lambda n: 1, _size_arg(0)), aten.zeros.default: _filled(lambda n: 0, _size_arg(0)),
    aten.full.default: _filled(lambda n: n.args[1], _size_arg(0)),
    aten.ones_like.default: _filled(lambda n: 1, _like), aten.zeros_like.default: _filled(lambda n: 0, _like),
    aten.full_like.default: _filled(lambda n: n.args[1], _like),
    aten.scalar_tensor.default: _filled(lambda n: n.args[0], lambda e, n: None),
    aten.linear.default: _linear, aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    aten.flatten.using_ints: _flatten,
    aten.add_.Tensor: _in_place(_binary("Add")), aten.sub_.Tensor: _in_place(_binary("Sub")),
    aten.mul_.Tensor: _in_place(_binary("Mul")), aten.div_.Tensor: _in_place(_binary("Div")),
    aten.addmm.default: _addmm, aten.baddbmm.default: _addmm, aten.stack.default: _stack,
    aten.layer_norm.default: _layer_norm, aten.cumsum.default: _cumsum,
    aten.tril.default: _trilu(0), aten.triu.default: _trilu(1),
    aten.sym_size.int: _sym_size,
    operator.add: _sym_binary("Add"), operator.sub: _sym_binary("Sub"), operator.mul: _sym_binary("Mul"),
    operator.floordiv: _sym_binary("Div"), operator.mod: _sym_binary("Mod"),
    torch.sym_max: _sym_binary("Max"), torch.sym_min: _sym_binary("Min"),
    operator.getitem: _getitem,
}


def to_onnx(gm: torch.fx.GraphModule, runs: list[tuple], input_names: list[str], input_dims: list[dict],
            output_names: list[str], opset: int, handlers: dict | None = None, domains: dict | None = None):
    """The program as an ``onnx_ir`` model. ``runs``: three example argument tuples of different sizes (fewer
    make it likelier that two different dynamic dimensions get one name); ``input_dims``: per input, {axis: name}
    of its dynamic dimensions, which names the same dimension everywhere in the graph. ``handlers``: {fx target:
    handler(emitter, node)} that take precedence over the shared table (a target's own forms of the lowbit ops);
    ``domains``: the opset imports besides the ONNX domain (default com.microsoft). Raises ``Unsupported``."""
    types = propagate(gm, runs)
    names = {}
    for i, dims in enumerate(input_dims):
        for axis, name in dims.items():
            names.setdefault(dim_name([args[i].shape[axis] for args in runs]), name)
    for node, t in types.items():
        for out in (t if isinstance(t, list) else []):
            if out is not None:
                out[1][:] = [names.get(d, d) if isinstance(d, str) else d for d in out[1]]
    inputs = []
    for name, arg, node in zip(input_names, runs[0], [n for n in gm.graph.nodes if n.op == "placeholder"]):
        inputs.append(ir.Value(name=name, shape=ir.Shape(types[node][0][1]), type=ir.TensorType(_dtype(arg.dtype))))
    return Emitter(gm, types, opset, handlers, domains).emit(inputs, output_names)
