"""The closed table of operators a lowbit program may call, with their argument schemas.

A program (``format.program``) is data: loading it must run nothing but the compiler's own vocabulary. This
table is that vocabulary: every operator the compiler emits for the architectures it is tested on, plus a
few pure ones the same models produce under other settings, each with the schema its arguments are checked
against before anything runs. No entry writes to its arguments (``schema.is_mutable`` is false for all; a
test holds it), reads or writes files, or returns uninitialized memory (``empty*``, which could hand the
process's own memory to the program's outputs).

The table is versioned: a program names the table it needs (``op_table``); a reader refuses one newer than
its own. Adding an operator means a new ``TABLE_VERSION`` (the operator listed in ``ADDED``); a program names the
oldest table that holds every operator it calls, so older readers still load the programs they can run.
"""

from __future__ import annotations

import math
import operator
import re
from functools import lru_cache

import torch

from lowbit.errors import LowbitError

TABLE_VERSION = 2
ADDED = {'lowbit::rotate.default': 2}          # operators newer than table 1, by the table that added them

# name -> the operator's schema (torch's own syntax; tests/format/test_untrusted_artifacts.py holds them equal to the
# installed torch's, so a torch that changed one is noticed).
SCHEMAS: dict[str, str] = {
    'aten::__and__.Tensor':
        'aten::__and__.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::_to_copy.default':
        'aten::_to_copy(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None, bool non_blocking=False, MemoryFormat? memory_format=None) -> Tensor',
    'aten::abs.default':
        'aten::abs(Tensor self) -> Tensor',
    'aten::add.Scalar':
        'aten::add.Scalar(Tensor self, Scalar other, Scalar alpha=1) -> Tensor',
    'aten::add.Tensor':
        'aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor',
    'aten::addmm.default':
        'aten::addmm(Tensor self, Tensor mat1, Tensor mat2, *, Scalar beta=1, Scalar alpha=1) -> Tensor',
    'aten::alias.default':
        'aten::alias(Tensor(a) self) -> Tensor(a)',
    'aten::amax.default':
        'aten::amax(Tensor self, int[1] dim=[], bool keepdim=False) -> Tensor',
    'aten::any.default':
        'aten::any(Tensor self) -> Tensor',
    'aten::arange.default':
        'aten::arange(Scalar end, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::arange.start':
        'aten::arange.start(Scalar start, Scalar end, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::arange.start_step':
        'aten::arange.start_step(Scalar start, Scalar end, Scalar step=1, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::argmax.default':
        'aten::argmax(Tensor self, int? dim=None, bool keepdim=False) -> Tensor',
    'aten::baddbmm.default':
        'aten::baddbmm(Tensor self, Tensor batch1, Tensor batch2, *, Scalar beta=1, Scalar alpha=1) -> Tensor',
    'aten::bitwise_not.default':
        'aten::bitwise_not(Tensor self) -> Tensor',
    'aten::bitwise_or.Tensor':
        'aten::bitwise_or.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::bmm.default':
        'aten::bmm(Tensor self, Tensor mat2) -> Tensor',
    'aten::cat.default':
        'aten::cat(Tensor[] tensors, int dim=0) -> Tensor',
    'aten::chunk.default':
        'aten::chunk(Tensor(a -> *) self, int chunks, int dim=0) -> Tensor(a)[]',
    'aten::clamp.default':
        'aten::clamp(Tensor self, Scalar? min=None, Scalar? max=None) -> Tensor',
    'aten::clamp_max.default':
        'aten::clamp_max(Tensor self, Scalar max) -> Tensor',
    'aten::clamp_min.default':
        'aten::clamp_min(Tensor self, Scalar min) -> Tensor',
    'aten::clone.default':
        'aten::clone(Tensor self, *, MemoryFormat? memory_format=None) -> Tensor',
    'aten::contiguous.default':
        'aten::contiguous(Tensor(a) self, *, MemoryFormat memory_format=0) -> Tensor(a)',
    'aten::cos.default':
        'aten::cos(Tensor self) -> Tensor',
    'aten::cumsum.default':
        'aten::cumsum(Tensor self, int dim, *, ScalarType? dtype=None) -> Tensor',
    'aten::detach.default':
        'aten::detach(Tensor(a) self) -> Tensor(a)',
    'aten::div.Scalar':
        'aten::div.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::div.Tensor':
        'aten::div.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::div.Tensor_mode':
        'aten::div.Tensor_mode(Tensor self, Tensor other, *, str? rounding_mode) -> Tensor',
    'aten::dropout.default':
        'aten::dropout(Tensor input, float p, bool train) -> Tensor',
    'aten::embedding.default':
        'aten::embedding(Tensor weight, Tensor indices, SymInt padding_idx=-1, bool scale_grad_by_freq=False, bool sparse=False) -> Tensor',
    'aten::eq.Scalar':
        'aten::eq.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::eq.Tensor':
        'aten::eq.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::erf.default':
        'aten::erf(Tensor self) -> Tensor',
    'aten::exp.default':
        'aten::exp(Tensor self) -> Tensor',
    'aten::expand.default':
        'aten::expand(Tensor(a) self, SymInt[] size, *, bool implicit=False) -> Tensor(a)',
    'aten::expand_as.default':
        'aten::expand_as(Tensor(a) self, Tensor other) -> Tensor(a)',
    'aten::flatten.using_ints':
        'aten::flatten.using_ints(Tensor(a) self, int start_dim=0, int end_dim=-1) -> Tensor(a)',
    'aten::floor_divide.default':
        'aten::floor_divide(Tensor self, Tensor other) -> Tensor',
    'aten::full.default':
        'aten::full(SymInt[] size, Scalar fill_value, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::full_like.default':
        'aten::full_like(Tensor self, Scalar fill_value, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor',
    'aten::gather.default':
        'aten::gather(Tensor self, int dim, Tensor index, *, bool sparse_grad=False) -> Tensor',
    'aten::ge.Scalar':
        'aten::ge.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::ge.Tensor':
        'aten::ge.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::gelu.default':
        'aten::gelu(Tensor self, *, str approximate="none") -> Tensor',
    'aten::gt.Scalar':
        'aten::gt.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::gt.Tensor':
        'aten::gt.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::hardtanh.default':
        'aten::hardtanh(Tensor self, Scalar min_val=-1, Scalar max_val=1) -> Tensor',
    'aten::index.Tensor':
        'aten::index.Tensor(Tensor self, Tensor?[] indices) -> Tensor',
    'aten::index_select.default':
        'aten::index_select(Tensor self, int dim, Tensor index) -> Tensor',
    'aten::layer_norm.default':
        'aten::layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1.0000000000000001e-05, bool cudnn_enable=True) -> Tensor',
    'aten::le.Scalar':
        'aten::le.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::le.Tensor':
        'aten::le.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::lift_fresh_copy.default':
        'aten::lift_fresh_copy(Tensor self) -> Tensor',
    'aten::linear.default':
        'aten::linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor',
    'aten::log.default':
        'aten::log(Tensor self) -> Tensor',
    'aten::log_softmax.int':
        'aten::log_softmax.int(Tensor self, int dim, ScalarType? dtype=None) -> Tensor',
    'aten::logical_and.default':
        'aten::logical_and(Tensor self, Tensor other) -> Tensor',
    'aten::logical_not.default':
        'aten::logical_not(Tensor self) -> Tensor',
    'aten::logical_or.default':
        'aten::logical_or(Tensor self, Tensor other) -> Tensor',
    'aten::lt.Scalar':
        'aten::lt.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::lt.Tensor':
        'aten::lt.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::masked_fill.Scalar':
        'aten::masked_fill.Scalar(Tensor self, Tensor mask, Scalar value) -> Tensor',
    'aten::masked_fill.Tensor':
        'aten::masked_fill.Tensor(Tensor self, Tensor mask, Tensor value) -> Tensor',
    'aten::matmul.default':
        'aten::matmul(Tensor self, Tensor other) -> Tensor',
    'aten::max.dim':
        'aten::max.dim(Tensor self, int dim, bool keepdim=False) -> (Tensor values, Tensor indices)',
    'aten::maximum.default':
        'aten::maximum(Tensor self, Tensor other) -> Tensor',
    'aten::mean.default':
        'aten::mean(Tensor self, *, ScalarType? dtype=None) -> Tensor',
    'aten::mean.dim':
        'aten::mean.dim(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor',
    'aten::min.dim':
        'aten::min.dim(Tensor self, int dim, bool keepdim=False) -> (Tensor values, Tensor indices)',
    'aten::minimum.default':
        'aten::minimum(Tensor self, Tensor other) -> Tensor',
    'aten::mm.default':
        'aten::mm(Tensor self, Tensor mat2) -> Tensor',
    'aten::mul.Scalar':
        'aten::mul.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::mul.Tensor':
        'aten::mul.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::ne.Scalar':
        'aten::ne.Scalar(Tensor self, Scalar other) -> Tensor',
    'aten::ne.Tensor':
        'aten::ne.Tensor(Tensor self, Tensor other) -> Tensor',
    'aten::neg.default':
        'aten::neg(Tensor self) -> Tensor',
    'aten::new_ones.default':
        'aten::new_ones(Tensor self, SymInt[] size, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::new_zeros.default':
        'aten::new_zeros(Tensor self, SymInt[] size, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::numpy_T.default':
        'aten::numpy_T(Tensor(a) self) -> Tensor(a)',
    'aten::ones.default':
        'aten::ones(SymInt[] size, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::ones_like.default':
        'aten::ones_like(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor',
    'aten::permute.default':
        'aten::permute(Tensor(a) self, int[] dims) -> Tensor(a)',
    'aten::pow.Tensor_Scalar':
        'aten::pow.Tensor_Scalar(Tensor self, Scalar exponent) -> Tensor',
    'aten::pow.Tensor_Tensor':
        'aten::pow.Tensor_Tensor(Tensor self, Tensor exponent) -> Tensor',
    'aten::relu.default':
        'aten::relu(Tensor self) -> Tensor',
    'aten::repeat_interleave.self_int':
        'aten::repeat_interleave.self_int(Tensor self, SymInt repeats, int? dim=None, *, SymInt? output_size=None) -> Tensor',
    'aten::reshape.default':
        'aten::reshape(Tensor(a) self, SymInt[] shape) -> Tensor(a)',
    'aten::rsqrt.default':
        'aten::rsqrt(Tensor self) -> Tensor',
    'aten::rsub.Scalar':
        'aten::rsub.Scalar(Tensor self, Scalar other, Scalar alpha=1) -> Tensor',
    'aten::scalar_tensor.default':
        'aten::scalar_tensor(Scalar s, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::scaled_dot_product_attention.default':
        'aten::scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0., bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor',
    'aten::select.int':
        'aten::select.int(Tensor(a) self, int dim, SymInt index) -> Tensor(a)',
    'aten::sigmoid.default':
        'aten::sigmoid(Tensor self) -> Tensor',
    'aten::silu.default':
        'aten::silu(Tensor self) -> Tensor',
    'aten::sin.default':
        'aten::sin(Tensor self) -> Tensor',
    'aten::slice.Tensor':
        'aten::slice.Tensor(Tensor(a) self, int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1) -> Tensor(a)',
    'aten::softmax.int':
        'aten::softmax.int(Tensor self, int dim, ScalarType? dtype=None) -> Tensor',
    'aten::split.Tensor':
        'aten::split.Tensor(Tensor(a -> *) self, SymInt split_size, int dim=0) -> Tensor(a)[]',
    'aten::split_with_sizes.default':
        'aten::split_with_sizes(Tensor(a -> *) self, SymInt[] split_sizes, int dim=0) -> Tensor(a)[]',
    'aten::sqrt.default':
        'aten::sqrt(Tensor self) -> Tensor',
    'aten::squeeze.dim':
        'aten::squeeze.dim(Tensor(a) self, int dim) -> Tensor(a)',
    'aten::squeeze.dims':
        'aten::squeeze.dims(Tensor(a) self, int[] dim) -> Tensor(a)',
    'aten::stack.default':
        'aten::stack(Tensor[] tensors, int dim=0) -> Tensor',
    'aten::sub.Scalar':
        'aten::sub.Scalar(Tensor self, Scalar other, Scalar alpha=1) -> Tensor',
    'aten::sub.Tensor':
        'aten::sub.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor',
    'aten::sum.default':
        'aten::sum(Tensor self, *, ScalarType? dtype=None) -> Tensor',
    'aten::sum.dim_IntList':
        'aten::sum.dim_IntList(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor',
    'aten::sym_numel.default':
        'aten::sym_numel(Tensor self) -> SymInt',
    'aten::sym_size.int':
        'aten::sym_size.int(Tensor self, int dim) -> SymInt',
    'aten::t.default':
        'aten::t(Tensor(a) self) -> Tensor(a)',
    'aten::tanh.default':
        'aten::tanh(Tensor self) -> Tensor',
    'aten::to.device':
        'aten::to.device(Tensor(a) self, Device device, ScalarType dtype, bool non_blocking=False, bool copy=False, MemoryFormat? memory_format=None) -> Tensor(a)',
    'aten::to.dtype':
        'aten::to.dtype(Tensor(a) self, ScalarType dtype, bool non_blocking=False, bool copy=False, MemoryFormat? memory_format=None) -> Tensor(a)',
    'aten::to.dtype_layout':
        'aten::to.dtype_layout(Tensor(a) self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None, bool non_blocking=False, bool copy=False, MemoryFormat? memory_format=None) -> Tensor(a)',
    'aten::transpose.int':
        'aten::transpose.int(Tensor(a) self, int dim0, int dim1) -> Tensor(a)',
    'aten::tril.default':
        'aten::tril(Tensor self, SymInt diagonal=0) -> Tensor',
    'aten::triu.default':
        'aten::triu(Tensor self, SymInt diagonal=0) -> Tensor',
    'aten::type_as.default':
        'aten::type_as(Tensor self, Tensor other) -> Tensor',
    'aten::unbind.int':
        'aten::unbind.int(Tensor(a -> *) self, int dim=0) -> Tensor(a)[]',
    'aten::unsqueeze.default':
        'aten::unsqueeze(Tensor(a) self, int dim) -> Tensor(a)',
    'aten::view.default':
        'aten::view(Tensor(a) self, SymInt[] size) -> Tensor(a)',
    'aten::view_as.default':
        'aten::view_as(Tensor(a) self, Tensor other) -> Tensor(a)',
    'aten::where.ScalarOther':
        'aten::where.ScalarOther(Tensor condition, Tensor self, Scalar other) -> Tensor',
    'aten::where.ScalarSelf':
        'aten::where.ScalarSelf(Tensor condition, Scalar self, Tensor other) -> Tensor',
    'aten::where.self':
        'aten::where.self(Tensor condition, Tensor self, Tensor other) -> Tensor',
    'aten::zeros.default':
        'aten::zeros(SymInt[] size, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None) -> Tensor',
    'aten::zeros_like.default':
        'aten::zeros_like(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor',
    'lowbit::act_mul.default':
        'lowbit::act_mul(Tensor y, str act) -> Tensor',
    'lowbit::act_mul_quant_int8.default':
        'lowbit::act_mul_quant_int8(Tensor y, str act) -> (Tensor, Tensor)',
    'lowbit::attention.default':
        'lowbit::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, SymInt kv_groups) -> Tensor',
    'lowbit::layernorm_quant_int8.default':
        'lowbit::layernorm_quant_int8(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)',
    'lowbit::rmsnorm_quant_int8.default':
        'lowbit::rmsnorm_quant_int8(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)',
    'lowbit::rotate.default':
        'lowbit::rotate(Tensor x, Tensor signs, Tensor left, Tensor right) -> Tensor',
    'lowbit::w8a8_linear.default':
        'lowbit::w8a8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, SymInt bits, SymInt group_size, SymInt in_features, Tensor? residual=None) -> Tensor',
    'lowbit::w8a8_linear_codes.default':
        'lowbit::w8a8_linear_codes(Tensor xq, Tensor sx, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, SymInt bits, SymInt group_size, SymInt in_features, ScalarType dtype, Tensor? residual=None) -> Tensor',
    'lowbit::wna16_embedding.default':
        'lowbit::wna16_embedding(Tensor ids, Tensor qweight, Tensor scales, Tensor zeros, SymInt bits, SymInt group_size, SymInt dim, ScalarType dtype) -> Tensor',
    'lowbit::wna16_linear.default':
        'lowbit::wna16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, SymInt bits, SymInt group_size, SymInt in_features, Tensor? residual=None) -> Tensor',
}

# Symbolic-size arithmetic the tracer records as plain Python calls.
PY_FUNCTIONS = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt",
        "ge", "and_", "or_", "not_")},
    **{f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite")},
    "math.ceil": math.ceil, "math.floor": math.floor, "math.sqrt": math.sqrt,
}
# The values a string argument may take: what the operator accepts (anything else would fail inside it).
STRING_CHOICES = {("aten::div.Tensor_mode", "rounding_mode"): ("trunc", "floor"),
                  ("aten::gelu.default", "approximate"): ("none", "tanh"),
                  ("lowbit::act_mul.default", "act"): ("silu", "gelu", "gelu_tanh"),
                  ("lowbit::act_mul_quant_int8.default", "act"): ("silu", "gelu", "gelu_tanh")}
_SCALAR_TAGS = {"ScalarType": "dtype", "Layout": "layout", "MemoryFormat": "memory_format", "Device": "device"}


@lru_cache(maxsize=None)
def arguments(name: str) -> tuple:
    """The parsed schema arguments of table operator ``name``: (name, type string, has default, keyword-only)."""
    schema = torch._C.parse_schema(SCHEMAS[name])
    return tuple((a.name, str(a.real_type), a.has_default_value(), a.kwarg_only) for a in schema.arguments)


def needed(targets) -> int:
    """The oldest table version that holds every operator in ``targets``."""
    return max([1, *(ADDED.get(t, 1) for t in targets)])


def resolve(name: str, version: int, where: str):
    """The callable for a program's call target ``name``: a table operator (``torch.ops``) or a size function."""
    if version > TABLE_VERSION:
        raise LowbitError(f"{where} needs operator table {version}; this lowbit has table {TABLE_VERSION}: "
                          "upgrade lowbit")
    if name in PY_FUNCTIONS:
        return PY_FUNCTIONS[name]
    if ADDED.get(name, 1) > version:
        raise LowbitError(f"{where} calls '{name}', which operator table {ADDED[name]} added, but names table "
                          f"{version}; refusing it (recompile it)")
    if name not in SCHEMAS:
        raise LowbitError(f"{where} calls '{name}', which is not in lowbit's operator table; refusing to load it "
                          "(a program may call only the operators the compiler emits; if this lowbit compiled it "
                          "earlier, recompile it)")
    ns, rest = name.split("::", 1)
    op, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise LowbitError(f"{where} calls operator '{name}', which this torch lacks (or lowbit's ops are not "
                          "registered: import lowbit.ops first); install the torch in constraints.txt") from None


def check_call(name: str, args: list, kwargs: dict, where: str) -> None:
    """Refuse a call whose (JSON-encoded) arguments do not fit the table's schema of ``name``: too many or
    missing positional arguments, unknown keywords, or a value of the wrong kind."""
    if name in PY_FUNCTIONS:
        if name == "operator.getitem":      # an element of an operator's tuple output
            ok = len(args) == 2 and is_node(args[0]) and is_int(args[1])
        else:
            ok = 1 <= len(args) <= 3 and all(is_node(v) or _fits(v, "number") for v in args)
        if kwargs or not ok:
            raise LowbitError(f"{where}: {name} takes size values and numbers only")
        return
    params = arguments(name)
    positional = [p for p in params if not p[3]]
    if len(args) > len(positional):
        raise LowbitError(f"{where}: {name} takes {len(positional)} positional arguments, the program gives "
                          f"{len(args)}")
    given = {p[0]: v for p, v in zip(positional, args)}
    for key, value in kwargs.items():
        if key in given or key not in {p[0] for p in params}:
            raise LowbitError(f"{where}: {name} has no argument '{key}' (or it is given twice)")
        given[key] = value
    for pname, typ, has_default, _ in params:
        if pname not in given:
            if not has_default:
                raise LowbitError(f"{where}: {name} lacks its argument '{pname}'")
        elif not _fits(given[pname], typ) or (isinstance(given[pname], str)
                                               and given[pname] not in STRING_CHOICES.get((name, pname), ())):
            raise LowbitError(f"{where}: {name}'s argument '{pname}' must be {typ}"
                              + (f" (one of {', '.join(STRING_CHOICES[name, pname])})"
                                 if (name, pname) in STRING_CHOICES else "")
                              + f", the program gives {_kind(given[pname])} {str(given[pname])[:40]!r}")


def _kind(v) -> str:
    return next(iter(v)) if isinstance(v, dict) and len(v) == 1 else type(v).__name__


def _fits(v, typ: str) -> bool:
    """Whether encoded value ``v`` can be a ``typ`` (a schema type string). A node reference can be anything
    but a literal-only type: its value is computed by the program from table operators."""
    inner = re.fullmatch(r"(Optional|List)\[(.*)\]", typ)
    if inner:
        kind, sub = inner.groups()
        if kind == "Optional":
            return v is None or _fits(v, sub)
        if isinstance(v, dict) and set(v) <= {"list", "tuple"} and len(v) == 1:
            items = next(iter(v.values()))
            return isinstance(items, list) and all(_fits(x, sub) for x in items)
        return is_node(v) or (sub in ("int", "SymInt") and is_int(v))      # int[1] takes a single int
    if is_node(v):
        return typ not in _SCALAR_TAGS and typ != "str"
    if typ in ("int", "SymInt"):
        return is_int(v)
    if typ in ("float", "number", "Scalar", "Tensor"):     # torch wraps a number given for a Tensor
        return is_int(v) or isinstance(v, (float, bool)) or (isinstance(v, dict) and set(v) == {"float"}
                                                               and v["float"] in ("inf", "-inf", "nan"))
    if typ == "bool":
        return isinstance(v, bool)
    if typ == "str":
        return isinstance(v, str)
    if typ in _SCALAR_TAGS:
        return isinstance(v, dict) and set(v) == {_SCALAR_TAGS[typ]} and isinstance(v[_SCALAR_TAGS[typ]], str)
    return False


def is_node(v) -> bool:
    """Whether encoded value ``v`` is a reference to a node: ``{"node": name}``."""
    return isinstance(v, dict) and set(v) == {"node"} and isinstance(v["node"], str)


def is_int(v) -> bool:
    """An integer that is not a bool (JSON's true is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool)
