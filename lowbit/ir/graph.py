"""The graph IR: a torch.export GraphModule plus what passes need to see in it.

The traced module keeps weights as ``get_attr`` nodes and each node's ``nn_module_stack``, so a pass sees
both the flat dataflow and the model's structure. This module finds the quantizable matmuls (any
``aten.linear`` / ``aten.addmm`` / ``aten.mm`` whose weight is a constant of the model, GPT-2's Conv1D
included), names each by the module that owns it (``model.layers.0.self_attn.q_proj``), groups nodes into
blocks (``model.layers.0``) and performs the one rewrite quantization needs: replace a matmul by a
``lowbit::`` op reading packed buffers.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lowbit.format.program import mask_positions
from lowbit.format.quantize import QuantSpec, storage_bytes
from lowbit import ops  # noqa: F401  (registers torch.ops.lowbit.*)

# The frontend wraps the HF model in a module whose attribute is this name; IR names drop it.
ROOT_PREFIX = "hf."

_aten = torch.ops.aten
# ``x @ W.T`` written with the operator (Falcon's FalconLinear) traces to matmul of ``numpy_T(W)``: an mm site.
_MATMULS = {_aten.linear.default: "linear", _aten.addmm.default: "addmm", _aten.mm.default: "mm",
            _aten.matmul.default: "mm"}
_FULL_TRANSPOSES = {_aten.t.default, _aten.numpy_T.default}
_TRANSPOSES = {*_FULL_TRANSPOSES, _aten.transpose.int, _aten.permute.default}
_BLOCK_RE = re.compile(r"^(.*?\.\d+)(\.|$)")
# Where a dropped constant's stand-in (shape and dtype, no storage) is made.
_FAKE = FakeTensorMode(allow_non_fake_inputs=True)


@dataclass
class MatmulSite:
    """One quantizable matmul: ``y = x @ W.T + b`` with W [out_features, in_features] as quantized."""

    name: str                     # owning module path, e.g. "model.layers.0.mlp.down_proj"
    node: fx.Node
    kind: str                     # linear | addmm | mm
    weight_attr: str              # get_attr target holding the parameter
    weight_is_kn: bool            # parameter stored [K, N] (Conv1D, mm/addmm without transpose)
    bias_attr: Optional[str]
    in_features: int
    out_features: int
    block: Optional[str]          # e.g. "model.layers.0"; None outside repeated blocks (lm_head)
    module_type: str

    @property
    def input_node(self) -> fx.Node:
        """The activation operand; matmuls sharing it share a calibration Hessian (Q/K/V, gate/up)."""
        return self.node.args[1] if self.kind == "addmm" else self.node.args[0]


@dataclass
class EmbeddingSite:
    """A token-embedding lookup ``W[ids]`` with W [num_embeddings, dim] a constant of the model."""

    name: str                     # owning module path, e.g. "model.embed_tokens"
    node: fx.Node
    weight_attr: str
    num_embeddings: int
    dim: int


@dataclass
class QuantizedLayer:
    """A matmul or embedding after a weight pass: its packed tensors and format, as lowering writes them.

    For an embedding, ``out_features`` is the number of rows (vocabulary) and ``in_features`` the row size.
    """

    name: str
    op: str                       # "wna16_linear" | "w8a8_linear" | "wna16_embedding"
    spec: QuantSpec
    in_features: int
    out_features: int
    group_size: int               # effective group (in_features when per-channel)
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: Optional[torch.Tensor]
    method: str                   # rtn | gptq | ...
    stats: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def layout(self) -> dict:
        """JSON description of this layer (the artifact's graph.json entry)."""
        return {"op": self.op, "bits": self.spec.bits, "group_size": self.group_size,
                "recipe_group_size": self.spec.group_size, "sym": self.spec.sym,
                "in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None, "method": self.method, "stats": self.stats}

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.out_features, self.in_features, self.spec)


def _strip(name: str) -> str:
    return name[len(ROOT_PREFIX):] if name.startswith(ROOT_PREFIX) else name


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module a traced node came from ("" when none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    return _strip(path), str(typ).rsplit(".", 1)[-1].strip("'>")


def block_of(path: str) -> Optional[str]:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the first indexed container)."""
    m = _BLOCK_RE.match(path)
    return m.group(1) if m else None


class Graph:
    """A traced model: ``gm`` (the GraphModule), its matmul ``sites``, ``blocks`` and ``quantized`` layers."""

    def __init__(self, gm: fx.GraphModule, model_type: str, task: str, kv: Optional[list] = None,
                 dtype: torch.dtype = torch.float32, attention: str = ""):
        self.gm = gm
        # Causal LMs: (kv heads, key dim, value dim) per layer, the shapes of the step's past/present tensors.
        self.kv = kv
        self.dtype = dtype
        self.vocab_size = 0                   # set by the frontend: the token ids the graph accepts
        self.attention = attention            # the transformers attention implementation that was traced
        # The checkpoint's float dtype (set by the frontend): float tensors it holds exactly are stored in it.
        self.storage_dtype: Optional[torch.dtype] = None
        # Where a weightless graph's constants come from (frontend.weights.CheckpointSource): ``attr`` reads a
        # FakeTensor constant from it on first use; None when the graph holds its weights.
        self.source = None
        # Constants already in the artifact's weight shards (the streaming compile): attribute -> (stored name,
        # stored narrower than the traced dtype); in the graph they are FakeTensors.
        self.written: dict[str, tuple[str, bool]] = {}
        self.writer = None                    # the format.shards.ShardWriter those went to
        # Constants added by rewrites (packed layers): attribute -> the name the artifact stores them under.
        self.tensor_names: dict[str, str] = {}
        # Scales/zero points a pass before the weight pass fixed per layer (LKD): {layer: (scale, zero)}.
        self.fixed_qparams: dict = {}
        self.model_type = model_type
        self.task = task                      # "causal-lm" | "encoder"
        self.quantized: OrderedDict[str, QuantizedLayer] = OrderedDict()
        self.sites: OrderedDict[str, MatmulSite] = OrderedDict()
        self.embeddings: OrderedDict[str, EmbeddingSite] = OrderedDict()
        self.input_embedding: Optional[str] = None    # set by the frontend: the token embedding's name
        # What the outputs do not depend on (BERT's pooler under a last-hidden-state output) is not the program.
        gm.graph.eliminate_dead_code()
        gm.recompile()
        self._find_sites()

    # ---- discovery -------------------------------------------------------------------------
    def _const_attr(self, node) -> Optional[str]:
        return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None

    def _weight_operand(self, w) -> tuple[Optional[str], bool]:
        """(get_attr target, is the parameter [K, N]?) for mm-style weight operands [K, N]."""
        attr = self._const_attr(w)
        if attr is not None:
            return attr, True
        if isinstance(w, fx.Node) and w.op == "call_function" and w.target in _TRANSPOSES:
            attr = self._const_attr(w.args[0])
            is_2d_swap = w.target in _FULL_TRANSPOSES or list(w.args[1:]) in ([1, 0], [[1, 0]], [0, 1], [-1, -2], [-2, -1])
            if attr is not None and is_2d_swap:
                return attr, False
        return None, False

    def _find_sites(self):
        counts: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            kind = _MATMULS.get(node.target) if node.op == "call_function" else None
            if kind is None:
                continue
            if kind == "linear":
                weight_attr, kn = self._const_attr(node.args[1]), False
                bias_attr = self._const_attr(node.args[2]) if len(node.args) > 2 else None
                if len(node.args) > 2 and node.args[2] is not None and bias_attr is None:
                    continue
            elif kind == "addmm":
                weight_attr, kn = self._weight_operand(node.args[2])
                bias_attr = self._const_attr(node.args[0])
                if bias_attr is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                    continue
            else:
                weight_attr, kn = self._weight_operand(node.args[1])
                bias_attr = None
            if weight_attr is None:
                continue                           # activation x activation (attention scores)
            w = self.attr(weight_attr)
            if w.dim() != 2:
                continue
            k, n = (w.shape[0], w.shape[1]) if kn else (w.shape[1], w.shape[0])
            path, typ = module_of(node)
            name = path or _strip(weight_attr).rsplit(".", 1)[0]
            if name in counts:                     # a module called twice: keep names unique
                counts[name] += 1
                name = f"{name}#{counts[name]}"
            else:
                counts[name] = 0
            self.sites[name] = MatmulSite(name, node, kind, weight_attr, kn, bias_attr, k, n,
                                          block_of(name), typ)

        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is _aten.embedding.default:
                attr = self._const_attr(node.args[0])
                path, _ = module_of(node)
                if attr is not None and path and path not in self.embeddings:
                    v, d = self.attr(attr).shape
                    self.embeddings[path] = EmbeddingSite(path, node, attr, v, d)

    # ---- access ----------------------------------------------------------------------------
    def attr(self, target: str) -> torch.Tensor:
        """The constant ``target``; a weightless graph's (a FakeTensor) is read from ``source`` and kept."""
        obj = self.attr_value(target)
        if self.source is not None and isinstance(obj, FakeTensor):
            obj = self.source.read(target)
            self.set_constant(target, obj)
        return obj

    def set_constant(self, target: str, value: torch.Tensor):
        owner_path, _, name = target.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        if name in owner._parameters:
            owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[name] = value

    def unbind(self, target: str):
        """Drop the constant's value, keeping its shape and dtype (a FakeTensor): read again from ``source`` when
        next used, or already written to the artifact."""
        t = self.attr_value(target)
        if not isinstance(t, FakeTensor):
            with _FAKE:
                self.set_constant(target, torch.empty(t.shape, dtype=t.dtype))

    def attr_value(self, target: str) -> torch.Tensor:
        """The constant as it is now (a FakeTensor when not read yet), reading nothing."""
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def constants(self) -> list[str]:
        """Every constant's attribute, in first-use order."""
        return list(dict.fromkeys(n.target for n in self.gm.graph.nodes if n.op == "get_attr"))

    def weight(self, site: MatmulSite) -> torch.Tensor:
        """The site's float weight in [out_features, in_features] orientation."""
        w = self.attr(site.weight_attr).detach()
        return w.t() if site.weight_is_kn else w

    def bias(self, site: MatmulSite) -> Optional[torch.Tensor]:
        return None if site.bias_attr is None else self.attr(site.bias_attr).detach()

    @property
    def blocks(self) -> "OrderedDict[Optional[str], list[MatmulSite]]":
        out: OrderedDict = OrderedDict()
        for site in self.sites.values():
            out.setdefault(site.block, []).append(site)
        return out

    # ---- rewrite ---------------------------------------------------------------------------
    def register_tensors(self, layer: str, tensors: dict) -> dict:
        """Attach a layer's packed tensors to the module as buffers; returns get_attr nodes by key."""
        prefix = "lowbit_" + re.sub(r"[^0-9a-zA-Z_]", "_", layer)
        for key, t in tensors.items():
            self.gm.register_buffer(f"{prefix}_{key}", t)
            self.tensor_names[f"{prefix}_{key}"] = f"{layer}.{key}"
        return {key: self.gm.graph.get_attr(f"{prefix}_{key}") for key in tensors}

    def _swap_node(self, site, op, make_args, q: QuantizedLayer):
        """Insert ``op(*make_args(attrs))`` before the site's node, reroute its users, drop the old node."""
        g = self.gm.graph
        with g.inserting_before(site.node):
            new = g.call_function(op, make_args(self.register_tensors(site.name, q.tensors())))
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        site.node = new
        self.quantized[site.name] = q
        if self.source is not None and isinstance(site, MatmulSite):
            self.unbind(site.weight_attr)      # a weightless graph: the float weight leaves memory with the swap

    def forget_packed(self, name: str):
        """Drop layer ``name``'s packed tensors from its QuantizedLayer (the graph's buffers keep them until the
        streaming compile writes them); its layout and stats stay."""
        q = self.quantized[name]
        self.quantized[name] = replace(q, qweight=None, scales=None, zeros=None, bias=None)

    def replace_with_quantized(self, site: MatmulSite, q: QuantizedLayer):
        """Swap the site's matmul for ``q``'s op (``lowbit::wna16_linear`` / ``w8a8_linear``) on packed buffers."""
        self._swap_node(site, getattr(torch.ops.lowbit, q.op).default, lambda a: (
            site.input_node, a["qweight"], a["scales"], a["zeros"], a.get("bias"), q.spec.bits, q.group_size,
            q.in_features), q)

    def replace_embedding(self, site: EmbeddingSite, q: QuantizedLayer):
        """Swap the site's table lookup for ``lowbit::wna16_embedding`` over packed rows."""
        dtype = self.attr(site.weight_attr).dtype
        self._swap_node(site, torch.ops.lowbit.wna16_embedding.default, lambda a: (
            site.node.args[1], a["qweight"], a["scales"], a["zeros"], q.spec.bits, q.group_size, q.in_features,
            dtype), q)

    def prune(self):
        """Drop dead nodes, the float weights and packed buffers no node reads any more (a rule that merged layers
        leaves theirs behind)."""
        self.gm.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        read = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        for attr in [a for a in self.tensor_names if a not in read]:
            delattr(self.gm, attr)
            del self.tensor_names[attr]

    def finalize(self):
        """``prune``, then recompile the module."""
        self.prune()
        self.gm.recompile()

    # ---- running ---------------------------------------------------------------------------
    def step_args(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Optional[list] = None) -> tuple:
        """The step graph's arguments for ``input_ids`` after ``past`` (default: an empty cache); positions skip
        left padding."""
        b, s = input_ids.shape
        positions = mask_positions(attention_mask)[:, -s:]
        if past is None:
            past = [torch.empty(b, h, 0, d, dtype=self.dtype, device=input_ids.device)
                    for h, dk, dv in self.kv for d in (dk, dv)]
        return input_ids, attention_mask, positions, list(past)

    def stored_names(self) -> dict[str, str]:
        """Every constant's attribute -> its name in the artifact (module paths as transformers names them)."""
        names = {n.target: _strip(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}
        # A tied table is one attribute that torch.export names after one of its users; name it the embedding.
        names.update({e.weight_attr: f"{e.name}.weight" for e in self.embeddings.values()
                      if e.weight_attr in names and e.name not in self.quantized})
        return {**names, **self.tensor_names}

    def flat_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """The graph's placeholders in order, for a prefill of ``input_ids`` (the whole input of an encoder)."""
        if self.kv is None:
            return [input_ids, attention_mask]
        ids, mask, positions, past = self.step_args(input_ids, attention_mask)
        return [ids, mask, positions, *past]

    def call_args(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """``gm``'s arguments for a prefill of ``input_ids`` (the whole input of an encoder)."""
        return (input_ids, attention_mask) if self.kv is None else self.step_args(input_ids, attention_mask)

    def run(self, *args):
        """The graph's outputs for its placeholders ``args``; a weightless graph reads each constant from
        ``source`` when first used and drops it after its last (``ir.lazy``)."""
        if self.source is None:
            return self.gm(*args)
        from lowbit.ir.lazy import run_lazily

        return run_lazily(self, args)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of a prefill of ``input_ids`` (causal LMs), last hidden states (encoders)."""
        out = self.run(*self.call_args(input_ids, attention_mask))
        return out if self.kv is None else out[0]

    def summary(self) -> str:
        lines = [f"{self.model_type} ({self.task}): {len(self.sites)} quantizable matmuls in "
                 f"{len([b for b in self.blocks if b])} blocks"]
        for s in self.sites.values():
            tag = self.quantized[s.name].spec.describe() if s.name in self.quantized else "float"
            lines.append(f"  {s.name:50s} {s.kind:6s} K={s.in_features:<6d} N={s.out_features:<6d} {tag}")
        return "\n".join(lines)
