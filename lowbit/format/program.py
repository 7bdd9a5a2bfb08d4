"""The shipped program: an fx graph of ``aten`` / ``lowbit`` ops as JSON, its tensors in safetensors.

A program is untrusted data. Loading it executes nothing from the files: node targets resolve only to the
operators of the closed table in ``op_table`` (each call's arguments checked against the table's schema
before anything runs) or to its fixed size functions; argument values are JSON scalars, node references and
tagged dtypes, devices, layouts and memory formats; a quantized op's packed tensors are checked against the
layout its arguments describe. Anything else is refused with one line. The document layout and its version
are described in docs/formats.md.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.format import op_table
from lowbit.format.quantize import check_packed

FORMAT = "lowbit.graph"
# 2: lowbit's quantized linear ops may carry a ``residual`` keyword (the residual_add rule). 3: float tensors may be
# stored narrower than the traced dtype (``widen``: the checkpoint's bfloat16 / float16 kept as it was). Readers take
# every version up to theirs; a writer stamps the lowest version its document needs.
VERSION = 3
WIDEN_VERSION = 3
# Checks of what the tracer saw (dtype and device metadata, shape guards): not part of the computation, and
# wrong once the program runs in another dtype or on another device.
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}
_TAGS = {torch.dtype: "dtype", torch.layout: "layout", torch.memory_format: "memory_format"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# What programs written before the operator table held after every lifted constant: an in-place detach, a no-op
# without autograd. Read as its input (nothing runs), so those artifacts still load.
_LEGACY_NO_OP = "aten::detach_.default"
# Quantized ops and the argument that names their weight's K (the embedding's row width).
_PACKED = {"lowbit::wna16_linear.default": "in_features", "lowbit::w8a8_linear.default": "in_features",
           "lowbit::w8a8_linear_codes.default": "in_features", "lowbit::wna16_embedding.default": "dim"}


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The step's position ids: they skip left padding (0 at each row's first real token), as transformers'
    generate does."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}::{target._opname}.{target._overloadname}"
        if name in op_table.SCHEMAS:
            return name
        raise LowbitError(f"the graph calls {name}, which is not in lowbit's operator table (lowbit/format/op_table.py)"
                          "; a program may hold only those operators: report the architecture")
    for name, fn in op_table.PY_FUNCTIONS.items():
        if fn is target:
            return name
    raise LowbitError(f"the graph calls {getattr(target, '__qualname__', target)!r}, which the lowbit graph format "
                      "cannot store (only the operator table's operators and symbolic-size arithmetic)")


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


def _decode_value(v, env: dict, device: torch.device, dtype_map: dict, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if not (isinstance(v, dict) and len(v) == 1):
        raise LowbitError(f"{where}: malformed argument value {str(v)[:60]}; recompile")
    (tag, x), = v.items()
    if tag == "node":
        if not isinstance(x, str) or x not in env:
            raise LowbitError(f"{where}: an argument reads node {str(x)[:60]!r}, which no earlier node defines")
        return env[x]
    if tag in ("list", "tuple") and isinstance(x, list):
        items = [_decode_value(i, env, device, dtype_map, where) for i in x]
        return items if tag == "list" else tuple(items)
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "device" and isinstance(x, str):
        return device
    if tag == "dtype" and isinstance(x, str):
        d = _torch_attr(x, torch.dtype)
        return dtype_map.get(d, d)
    if tag == "layout" and isinstance(x, str):
        return _torch_attr(x, torch.layout)
    if tag == "memory_format" and isinstance(x, str):
        return _torch_attr(x, torch.memory_format)
    raise LowbitError(f"{where}: argument value tagged {tag!r} is unknown to this lowbit or malformed")


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def encode(gm: fx.GraphModule, dtype: torch.dtype, names: Optional[dict] = None,
           storage: Optional[torch.dtype] = None,
           written: Optional[dict] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors) for ``gm``, whose float tensors and float dtype arguments are ``dtype``; ``names`` maps
    a constant's attribute path to the name it is stored under. Tensors that share storage (tied embeddings)
    are stored once. With ``storage`` (the checkpoint's dtype), a ``dtype`` tensor whose every value it holds
    exactly is stored in it and listed under ``widen`` (so it is never silently widened on disk). ``written``:
    constants already stored (attribute -> (name, widened), from ``stored_form``), named here, not returned."""
    names, written = names or {}, written or {}
    nodes, tensors, stored, widen = [], {}, {}, []
    for n in gm.graph.nodes:
        if (n.op == "call_module" or (n.op == "call_function" and n.target in _DROPPED)) and not n.users:
            continue
        if n.op == "placeholder":
            nodes.append({"op": "placeholder", "name": n.name})
        elif n.op == "get_attr" and n.target in written:
            key, widened = written[n.target]
            if widened and key not in widen:
                widen.append(key)
            nodes.append({"op": "get_attr", "name": n.name, "tensor": key})
        elif n.op == "get_attr":
            t = _attr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise LowbitError(f"graph constant {n.target} is a {type(t).__name__}, not a tensor")
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            key = stored.setdefault(ident, names.get(n.target, n.target))
            if key not in tensors:
                tensors[key], widened = stored_form(t, dtype, storage)
                if widened:
                    widen.append(key)
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
    table = op_table.needed(nd["target"] for nd in nodes if nd["op"] == "call")
    doc = {"format": FORMAT, "version": WIDEN_VERSION if widen else 2, "op_table": table,
           "dtype": str(dtype).removeprefix("torch."), "nodes": canonical_names(nodes)}
    if widen:
        doc["widen"] = widen
    return doc, tensors


def canonical_names(nodes: list) -> list:
    """``nodes`` (a document's) with every call node renamed by its position: the name fx gave it without its
    counter, numbered in order (``to``, ``to_1``, ...). Rewrites number their nodes in the order they ran (rule by
    rule over the graph, or block by block in the streaming compile); the program is the same either way."""
    taken = {nd["name"] for nd in nodes if nd["op"] != "call"}
    counts: dict[str, int] = {}
    rename: dict[str, str] = {}
    for nd in nodes:
        if nd["op"] != "call":
            continue
        base = re.sub(r"_\d+$", "", nd["name"])
        while True:
            k = counts.get(base, 0)
            counts[base] = k + 1
            name = base if k == 0 else f"{base}_{k}"
            if name not in taken:
                break
        rename[nd["name"]] = name
        taken.add(name)

    def fix(v):                     # an encoded argument value (_encode_value)
        if isinstance(v, dict) and len(v) == 1:
            (tag, x), = v.items()
            if tag == "node":
                return {"node": rename.get(x, x)}
            if tag in ("list", "tuple"):
                return {tag: [fix(i) for i in x]}
        return v

    out = []
    for nd in nodes:
        nd = {**nd, "name": rename.get(nd["name"], nd["name"])}
        if "args" in nd:
            nd["args"] = fix(nd["args"])
        if "kwargs" in nd:
            nd["kwargs"] = {k: fix(v) for k, v in nd["kwargs"].items()}
        out.append(nd)
    return out


def stored_form(t: torch.Tensor, dtype: torch.dtype, storage: Optional[torch.dtype]) -> tuple[torch.Tensor, bool]:
    """(the tensor as stored, whether it is stored narrower than ``dtype``): a ``dtype`` tensor that ``storage``
    (the checkpoint's dtype) holds exactly is stored in ``storage``."""
    t = t.detach().contiguous()
    if storage is not None and storage != dtype and t.dtype == dtype and _holds(storage, t):
        return t.to(storage), True
    return t, False


def _holds(storage: torch.dtype, t: torch.Tensor) -> bool:
    """Whether ``storage`` holds every value of ``t`` exactly (a bfloat16 checkpoint's weights loaded as float32)."""
    return bool(torch.equal(t.to(storage).to(t.dtype), t))


def check_document(doc, where: str):
    """Refuse a document that is not a program this lowbit reads: its format, version, operator table, dtype
    and node list."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LowbitError(f"{where} is not a lowbit program (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("version")
    if not (op_table.is_int(version) and 1 <= version <= VERSION):
        raise LowbitError(f"{where} is program format version {version}; this lowbit reads versions 1 to "
                          f"{VERSION}: use the lowbit that wrote it, or recompile")
    table = doc.get("op_table", 1)
    if not (op_table.is_int(table) and 1 <= table):
        raise LowbitError(f"{where}: op_table must be a positive integer, not {table!r}")
    if doc.get("dtype") not in _FLOAT_DTYPES or not isinstance(doc.get("nodes"), list):
        raise LowbitError(f"{where}: dtype must be one of {', '.join(_FLOAT_DTYPES)} and nodes a list; recompile")
    widen = doc.get("widen", [])
    if not (isinstance(widen, list) and all(isinstance(k, str) for k in widen)):
        raise LowbitError(f"{where}: widen must be a list of tensor names; recompile")


# Casts whose dtype argument can be the traced float dtype (``aten::to.device`` carries one too).
_CASTS = {"aten::to.dtype", "aten::to.dtype_layout", "aten::_to_copy.default", "aten::to.device"}
_VIEWS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.slice.Tensor,
          torch.ops.aten.view.default, torch.ops.aten.reshape.default}


def keep_upcasts(casts: list, traced: torch.dtype) -> set:
    """Give the traced dtype back to the model's precision upcasts among ``casts`` (mapped to a narrower dtype),
    which transformers computes in float32 whatever the model's dtype; returns the constants they read, to keep in
    the traced dtype. A float32 trace cannot tell them from the model's casts to its own dtype by their arguments,
    so they are found by what reads them; the casts back to the model's dtype after them stay mapped.
    - RMSNorm's variance: a cast that is squared (in float16 the demo LM's residual of 281 squares past 65504). In
      the trace ``x.float()`` returned x itself, so whatever read x after it reads the cast (the residual add,
      Gemma's ``type_as(x)``): those read x again; only the square and the product with the root read the cast.
    - Rotary angles: a cast of the position ids and the frequencies it multiplies (bfloat16 holds integers
      exactly only to 256, float16 to 2048)."""
    square, mul, rsqrt = torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.mul.Tensor, torch.ops.aten.rsqrt.default
    products = (mul, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)

    def keep(n):
        n.target, n.args, n.kwargs = torch.ops.aten.to.dtype, (n.args[0], traced), {}

    def squares(u, n) -> bool:
        return u.target is square and u.args[1] == 2 or u.target is mul and u.args == (n, n)

    def source(n):
        while isinstance(n, fx.Node) and n.target in _VIEWS:
            n = n.args[0]
        return n

    wide = set()
    for n in casts:
        x = n.args[0]
        if any(squares(u, n) for u in n.users):
            keep(n)
            for u in list(n.users):
                if not (squares(u, n) or u.target is mul and any(getattr(a, "target", None) is rsqrt for a in u.args)):
                    u.replace_input_with(n, x)
        elif getattr(source(x), "target", None) == "position_ids" and source(x).op == "placeholder":
            keep(n)
            for u in n.users:
                for other in (a for a in u.args if u.target in products and isinstance(a, fx.Node) and a is not n):
                    if other in casts:
                        keep(other)
                        other = other.args[0]
                    if source(other).op == "get_attr":
                        wide.add(source(other).target)
    return wide


def decode(doc: dict, tensors: dict[str, torch.Tensor], device="cpu", dtype: Optional[torch.dtype] = None,
           where: str = "program", narrow_tables: bool = False, narrow_heads: bool = True,
           keep_precision: bool = False) -> fx.GraphModule:
    """The GraphModule of a document on ``device``; with ``dtype``, float tensors and float dtype arguments that
    were the traced dtype become ``dtype``. Refuses (LowbitError) anything outside the format. ``tensors`` is
    emptied as they move into the module (so a caller's dict does not hold a second copy). ``narrow_tables``: a
    ``widen`` tensor read only as the table of ``aten.embedding`` stays in its stored dtype and the looked-up rows
    are converted instead (the same values, in half the memory for a bfloat16 vocabulary table); so does one read
    as the weight of ``aten.linear`` (a head, ``lowbit::narrow_linear``) unless ``narrow_heads`` is False.
    ``keep_precision``: in a ``dtype`` narrower than the traced one, the model's precision upcasts (RMSNorm's, the
    rotary angles') keep the traced dtype (``keep_upcasts``)."""
    check_document(doc, where)
    device = torch.device(device)
    traced = _torch_attr(doc["dtype"], torch.dtype)
    dtype_map = {traced: dtype} if dtype is not None and dtype != traced else {}
    keep_precision = keep_precision and bool(dtype_map) and dtype.itemsize < traced.itemsize
    try:
        return _build(doc, tensors, device, dtype_map, where, narrow_tables, narrow_heads, keep_precision)
    except RecursionError:
        raise LowbitError(f"{where}: argument values nested too deeply; refusing it") from None


def _build(doc: dict, tensors: dict, device: torch.device, dtype_map: dict, where: str,
           narrow_tables: bool = False, narrow_heads: bool = True, keep_precision: bool = False) -> fx.GraphModule:
    table = doc.get("op_table", 1)
    traced_tag, casts = {"dtype": doc["dtype"]}, []
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    constants: dict[str, str] = {}          # stored tensor name -> attribute on the module
    by_attr: dict[str, torch.Tensor] = {}   # attribute -> its stored tensor
    outputs = 0
    for i, nd in enumerate(doc["nodes"]):
        at = f"{where}: node {i}"
        name = nd.get("name") if isinstance(nd, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", name) or name in env:
            raise LowbitError(f"{at} has no name, a malformed one or a duplicate")
        op = nd.get("op")
        if outputs:
            raise LowbitError(f"{at} follows the output node")
        if op == "placeholder":
            env[name] = g.placeholder(name)
        elif op == "get_attr":
            key = nd.get("tensor")
            if not isinstance(key, str) or key not in tensors:
                raise LowbitError(f"{at} ({name}) reads tensor {str(key)[:80]!r}, which the tensors file lacks; "
                                  "recompile")
            if key not in constants:
                constants[key] = f"c{len(constants)}_" + re.sub(r"\W", "_", key)[-60:]
                by_attr[constants[key]] = tensors[key]
            env[name] = g.get_attr(constants[key])
        elif op == "call":
            target, args, kwargs = nd.get("target"), nd.get("args"), nd.get("kwargs", {})
            if not (isinstance(target, str) and isinstance(args, dict) and list(args) == ["list"]
                    and isinstance(args["list"], list) and isinstance(kwargs, dict)):
                raise LowbitError(f"{at} ({name}) is a malformed call")
            if target == _LEGACY_NO_OP and args["list"] and op_table.is_node(args["list"][0]) and not kwargs:
                env[name] = _decode_value(args["list"][0], env, device, dtype_map, where)
                continue
            fn = op_table.resolve(target, table, where)
            op_table.check_call(target, args["list"], kwargs, f"{at} ({name})")
            call_args = _decode_value({"tuple": args["list"]}, env, device, dtype_map, where)
            call_kwargs = {k: _decode_value(v, env, device, dtype_map, where) for k, v in kwargs.items()}
            if target in _PACKED:
                _check_packed_call(target, call_args, call_kwargs, by_attr, f"{at} ({name})")
            env[name] = g.call_function(fn, call_args, call_kwargs)
            if keep_precision and target in _CASTS and (traced_tag in args["list"] or traced_tag in kwargs.values()):
                casts.append(env[name])
        elif op == "output":
            g.output(_decode_value(nd.get("args"), env, device, dtype_map, where))
            outputs += 1
        else:
            raise LowbitError(f"{at}: node kind {str(op)[:40]!r} is unknown to this lowbit; upgrade it")
    if not outputs:
        raise LowbitError(f"{where} has no output node; recompile")
    root = torch.nn.Module()
    traced = _torch_attr(doc["dtype"], torch.dtype)
    wide = keep_upcasts(casts, traced)
    widen = set(doc.get("widen", []))
    narrow = (_narrow_tables(g, constants, widen, dtype_map.get(traced, traced), narrow_heads) if narrow_tables
              else set())
    for key, attr in constants.items():
        t = tensors.pop(key)
        if key in widen:
            if not t.is_floating_point():
                raise LowbitError(f"{where}: tensor {key[:80]!r} is listed to widen but holds {t.dtype}; recompile")
            if attr in narrow:
                root.register_buffer(attr, t.to(device=device))
                continue
            t = t.to(traced)               # stored in the checkpoint's narrower dtype: the value the trace held
        kept = t.dtype if attr in wide else dtype_map.get(t.dtype, t.dtype)      # wide: read by precision upcasts
        root.register_buffer(attr, t.to(device=device, dtype=kept))
        del t
    gm = fx.GraphModule(root, g)
    gm.meta["tensor_keys"] = {attr: key for key, attr in constants.items()}     # attribute -> stored tensor
    return gm


def _narrow_tables(g: fx.Graph, constants: dict, widen: set, dtype: torch.dtype, heads: bool = True) -> set:
    """The attributes of ``widen`` tensors read only as the table of ``aten.embedding`` or (``heads``) the weight
    of ``aten.linear``; the graph is rewritten in place so they stay narrow: each lookup's rows are converted to
    ``dtype`` after it, each linear becomes ``lowbit::narrow_linear`` (the weight widened block by block)."""
    embedding = torch.ops.aten.embedding.default
    linear = torch.ops.aten.linear.default if heads else None
    attrs = {constants[k] for k in widen if k in constants}
    out = set()
    for n in list(g.nodes):
        if n.op != "get_attr" or n.target not in attrs or not n.users:
            continue
        if all(_reads_only_as(u, n, 0) if u.target is embedding else u.target is linear and _reads_only_as(u, n, 1)
               for u in n.users):
            for u in list(n.users):
                if u.target is linear:
                    with g.inserting_after(u):
                        narrow = g.call_function(torch.ops.lowbit.narrow_linear.default,
                                                 (u.args[0], n, u.args[2] if len(u.args) > 2 else None))
                    u.replace_all_uses_with(narrow)
                    g.erase_node(u)
                    continue
                with g.inserting_after(u):
                    cast = g.call_function(torch.ops.aten.to.dtype, (u, dtype))
                u.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
            out.add(n.target)
    return out


def _reads_only_as(user: fx.Node, n: fx.Node, index: int) -> bool:
    """Whether ``user`` reads ``n`` as its positional argument ``index`` and nowhere else."""
    return (len(user.args) > index and user.args[index] is n and sum(a is n for a in user.args) == 1
            and n not in user.kwargs.values())


def _check_packed_call(target: str, args: tuple, kwargs: dict, by_attr: dict, where: str):
    """A quantized op's stored weight must have the layout its bits / group / K arguments describe
    (``by_attr``: the module attribute of each stored tensor read so far -> the tensor)."""
    names = [p[0] for p in op_table.arguments(target)]
    bound = {**dict(zip(names, args)), **kwargs}

    def stored(arg):
        node = bound.get(arg)
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise LowbitError(f"{where}: its {arg} must be a stored tensor")
        return by_attr[node.target]

    check_packed(stored("qweight"), stored("scales"), stored("zeros"), stored("bias"), bound.get("bits"),
                 bound.get("group_size"), bound.get(_PACKED[target]), where)
