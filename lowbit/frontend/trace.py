"""Frontend, tracing: a loaded model to the graph IR.

A causal LM is traced as the step a runtime executes (``CausalStep``: ids, mask, positions, past K/V -> logits,
present K/V), an encoder as its forward; ``torch.export`` with every dimension dynamic, so one graph serves every
batch, sequence and cache length (prefill is the step with an empty cache). The graph is made functional (no
in-place operator: the program's operator table holds none) and checked to serve one-token decode.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.frontend.load import LoadedModel, quiet_transformers
from lowbit.ir.graph import Graph

def cache_kwarg(model) -> str:
    """The KV-cache keyword of this model's forward: transformers 5 renamed ``past_key_values`` to ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CausalStep(torch.nn.Module):
    """The step a runtime executes, with the KV cache as flat tensors::

        (input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past [2L x [B, H_kv, P, D]])
            -> (logits [B, S, V], present [2L x [B, H_kv, P+S, D]])

    Prefill is the step with P = 0. Every layer keeps its whole past (sliding-window layers too: the mask
    applies the window), so present = concat(past, this step's keys/values) for every architecture.
    """

    def __init__(self, model: torch.nn.Module, n_layers: int):
        super().__init__()
        self.hf, self.n_layers, self.cache_kw = model, n_layers, cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, past: list):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self.cache_kw: cache})
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


class EncoderForward(torch.nn.Module):
    """(input_ids [B, S], attention_mask [B, S]) -> last hidden state [B, S, H]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def kv_layout(model) -> list[tuple[int, int, int]]:
    """(kv heads, key dim, value dim) per decoder layer, read from a real two-token forward."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True, **{cache_kwarg(model): cache})
    return [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in cache.layers]


@contextlib.contextmanager
def traced_attention(model):
    """Run ``model`` with lowbit's traceable attention where its architecture allows (see hf_attention)."""
    from lowbit.frontend import hf_attention

    before = model.config._attn_implementation
    if not hf_attention.supports(type(model), model.config):
        yield before
        return
    hf_attention.register()
    model.set_attn_implementation(hf_attention.NAME)
    try:
        yield hf_attention.NAME
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def exporting():
    """The settings of every lowbit torch.export: no grad, its warnings quiet, size-oblivious tracing, so sizes 0
    and 1 (an empty cache, a one-token step) are not specialized away, and no Python stack trace recorded per node
    (nothing reads them; on the demo LM they were a third of the trace's time)."""
    import torch.fx.config as fx_trace_config
    import torch.fx.experimental._config as fx_config

    stacks = getattr(fx_trace_config, "do_not_emit_stack_traces", None)
    fx_trace_config.do_not_emit_stack_traces = True
    try:
        with torch.no_grad(), warnings.catch_warnings(), fx_config.patch(backed_size_oblivious=True):
            warnings.simplefilter("ignore")
            yield
    finally:
        if stacks is None:
            del fx_trace_config.do_not_emit_stack_traces
        else:
            fx_trace_config.do_not_emit_stack_traces = stacks


def example_step(kv: list, vocab: int, dtype=torch.float32, sizes: tuple = (2, 3, 4)) -> tuple:
    """Example arguments of a causal step (input_ids, attention_mask, position_ids, past list): by default batch 2,
    3 new tokens after 4 cached ones, sizes distinct and above 1 so that tracing ties none of them to another."""
    g = torch.Generator().manual_seed(0)
    b, s, p = sizes
    past = [torch.randn(b, h, p, d, generator=g, dtype=dtype) for h, dk, dv in kv for d in (dk, dv)]
    return (torch.randint(0, vocab, (b, s), generator=g), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s), past)


def example_encoder_input(vocab: int, length: int, batch: int = 2) -> torch.Tensor:
    """Example input_ids of an encoder forward: ``batch`` rows of ``length`` tokens."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _export(root, args, dynamic, loaded):
    try:
        with exporting():
            return torch.export.export(root, args, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        arch = ",".join(getattr(loaded.config, "architectures", None) or [loaded.model_type])
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LowbitError(f"cannot trace architecture {arch} with torch.export: {msg}") from None


def trace(loaded: LoadedModel, decode_check: bool = True, weights=None) -> Graph:
    """torch.export the model's step (causal LMs) or forward (encoders), every dimension dynamic; the IR Graph.
    A weightless model (frontend/skeleton.py) traces too: with ``weights`` (its ``frontend.weights.
    CheckpointWeights``) the graph reads each constant from them when used (``Graph.source``); without,
    pass ``decode_check=False``, as the numeric one-token decode check needs weights."""
    with quiet_transformers():
        return _trace(loaded, decode_check, weights)


def _trace(loaded: LoadedModel, decode_check: bool = True, weights=None) -> Graph:
    from torch.export import Dim

    vocab = int(loaded.config.vocab_size)
    dyn = Dim.DYNAMIC
    dtype = next(loaded.model.parameters()).dtype
    with traced_attention(loaded.model) as attention:
        if loaded.task == "causal-lm":
            kv = kv_layout(loaded.model)
            args = example_step(kv, vocab, dtype)
            dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
                       "position_ids": {0: dyn, 1: dyn}, "past": [{0: dyn, 2: dyn}] * len(args[3])}
            ep = _export(CausalStep(loaded.model, len(kv)).eval(), args, dynamic, loaded)
        else:
            kv = None
            ids = example_encoder_input(vocab, min(16, loaded.max_positions))
            dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}}
            ep = _export(EncoderForward(loaded.model).eval(), (ids, torch.ones_like(ids)), dynamic, loaded)
    gm = _functional(_drop_empty_cats(_drop_guards(ep.module())))
    graph = Graph(gm, loaded.model_type, loaded.task, kv=kv, dtype=dtype, attention=attention)
    graph.vocab_size = vocab
    emb = loaded.model.get_input_embeddings()
    graph.input_embedding = next((n for n, m in loaded.model.named_modules() if m is emb), None)
    if weights is not None:
        from lowbit.frontend.weights import CheckpointSource

        graph.source = CheckpointSource(graph, weights, loaded.model)
    if kv is not None and decode_check:
        err = _decode_check(graph)
        if err is not None:
            raise decode_failure(graph, loaded.config, err)
    return graph


def _drop_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove torch.export's shape-guard check (``_guards_fn``): it pins what the tracer assumed (a step of
    two or more tokens where model code branches on ``q_len == 1``), which ``_decode_check`` verifies
    numerically instead, and the shipped program cannot carry it."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _drop_empty_cats(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``cat([empty constant, x])`` -> ``x``: a fresh DynamicCache's first update, which would copy the whole
    past once more every step."""
    passthrough = {torch.ops.aten.detach_.default, torch.ops.aten.detach.default,
                   torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.clone.default}
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target != torch.ops.aten.cat.default or len(n.args[0]) != 2:
            continue
        first = n.args[0][0]
        while first.op == "call_function" and first.target in passthrough:
            first = first.args[0]
        if first.op == "get_attr" and getattr(gm, first.target).numel() == 0:
            n.replace_all_uses_with(n.args[0][1])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _functional(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph without in-place operators, which a shipped program may not hold (``format.op_table``):
    ``detach_`` (a no-op without autograd) is dropped and ``x.add_(y)``-style calls on ``self`` become their
    out-of-place form, every later reader of ``x`` reading the result instead."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or not n.target._schema.is_mutable:
            continue
        packet = n.target.overloadpacket.__name__
        mutated = [a.name for a in n.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        functional = getattr(getattr(torch.ops.aten, packet.rstrip("_"), None), n.target._overloadname, None)
        if n.target.namespace != "aten" or mutated != ["self"] or not packet.endswith("_") or functional is None:
            raise LowbitError(f"the traced graph writes in place with {n.target} (node {n.name}), which a lowbit "
                              "program cannot hold; report the architecture")
        self_arg = n.args[0]
        if packet == "detach_":
            n.replace_all_uses_with(self_arg)
        else:
            with gm.graph.inserting_after(n):
                new = gm.graph.call_function(functional, n.args, n.kwargs)
            new.meta.update(n.meta)         # the traced value (shape, dtype) the rules read
            n.replace_all_uses_with(new)
            for user in list(self_arg.users):
                if user is not new and order.get(user, -1) > order[n]:
                    user.replace_input_with(self_arg, new)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def decode_check_runs(graph: Graph) -> list[tuple]:
    """The step's arguments for the one-token decode check: a prefill of 8 tokens (one row left-padded), a prefill
    of the first 7, and a one-token step whose past K/V must be the 7-token prefill's present K/V (here zeros of
    their shape)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, max(graph.vocab_size, 1), (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    past = [torch.zeros(2, h, 7, d, dtype=graph.dtype) for h, dk, dv in graph.kv for d in (dk, dv)]
    return [graph.step_args(ids, mask), graph.step_args(ids[:, :-1], mask[:, :-1]),
            graph.step_args(ids[:, -1:], mask, past)]


def decode_mismatch(full: torch.Tensor, step: torch.Tensor) -> Optional[str]:
    """None when the one-token step's last logits equal the full prefill's, else how far apart they are."""
    err = float((step - full).abs().max() / full.abs().max().clamp_min(1e-6))
    return None if err < 1e-4 else f"a one-token step differs from the prefill by {err:.1e} (relative)"


def _decode_check(graph: Graph):
    """None when the traced step also serves one-token decode, else why not: a prefill of 7 tokens then a
    one-token step over its cache must give the logits of a prefill of all 8 (the step path the tracer did not
    see against the one it did)."""
    full_args, prefix_args, step_args = decode_check_runs(graph)
    try:
        with torch.no_grad():
            full = graph.run(*full_args)[0][:, -1]
            prefix = graph.run(*prefix_args)
            step = graph.run(*step_args[:3], list(prefix[1:]))[0][:, -1]
    except LowbitError:
        raise                       # a checkpoint tensor the run read is bad: its own message
    except Exception as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return decode_mismatch(full, step)


def decode_failure(graph: Graph, config, why: str) -> LowbitError:
    arch = ",".join(getattr(config, "architectures", None) or [graph.model_type])
    return LowbitError(f"architecture {arch}: the traced step does not serve one-token decode ({why})")
