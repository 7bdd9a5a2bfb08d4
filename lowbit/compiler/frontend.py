"""Frontend: load a transformers model from a local folder and trace it to the graph IR.

Only local folders (or the word ``demo``) are accepted: lowbit never downloads. A causal LM is traced as
the step a runtime executes (``CausalStep``: ids, mask, positions, past K/V -> logits, present K/V), an
encoder as its forward; ``torch.export`` with every dimension dynamic, so one graph serves every batch,
sequence and cache length (prefill is the step with an empty cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.compiler.ir import Graph
from lowbit.errors import LowbitError

# Config fields that mark a mixture-of-experts model (routed experts are not lowered yet).
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object            # a transformers tokenizer, or None when the folder has none
    config: object
    path: Path
    task: str                    # "causal-lm" | "encoder"

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def max_positions(self) -> int:
        return max_positions(self.config)


def max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def eos_token_ids(config) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception:  # a folder without tokenizer files is still a model; callers that need one say so
        return None


def quiet_transformers():
    """transformers is chatty (per-weight progress bars, config warnings); lowbit prints its own progress."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch._export")
    warnings.filterwarnings("ignore", module="transformers")


def resolve_model_path(arg: str) -> Path:
    if arg in ("demo", "demo-encoder"):
        from lowbit.demo.assets import ensure_assets

        return Path(ensure_assets()["model" if arg == "demo" else "encoder"])
    path = Path(arg).expanduser()
    if not path.exists():
        raise LowbitError(f"model path '{arg}' does not exist; pass a local transformers model folder, 'demo' or 'demo-encoder'")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LowbitError(f"'{arg}' is not a transformers model folder (no config.json); "
                          "pass a folder written by save_pretrained() or 'demo'")
    return path


def _raw_config(path: Path) -> dict:
    """config.json as a dict, or a one-line error saying why it is not one."""
    file = path / "config.json"
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise LowbitError(f"cannot read {file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LowbitError(f"cannot read {file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); pass a folder written by save_pretrained()") from None
    except json.JSONDecodeError as e:
        raise LowbitError(f"cannot read {file}: {e}") from None
    if not isinstance(raw, dict):
        raise LowbitError(f"cannot read {file}: a transformers config is a JSON object, this is a "
                          f"{type(raw).__name__}")
    return raw


def read_config(path: Path):
    """The folder's transformers config, refused with the reason when lowbit cannot compile its architecture."""
    from transformers import AutoConfig

    raw = _raw_config(path)
    names = raw.get("architectures") if isinstance(raw.get("architectures"), list) else []
    arch = ",".join(map(str, names)) or f"model_type={raw.get('model_type')!r}"
    try:
        # Never run (or offer to run) Python shipped in the folder: its auto_map is ignored.
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as e:
        if raw.get("auto_map"):
            raise LowbitError(f"{arch} needs the Python code in its model folder (auto_map in config.json); lowbit "
                              "does not run a model folder's own code, only architectures transformers has built in"
                              ) from None
        raise LowbitError(f"transformers cannot read the config of {arch} ({str(e).splitlines()[0][:160]}); "
                          "a newer transformers may know it") from None
    if getattr(config, "is_encoder_decoder", False):
        raise LowbitError(f"{arch} is an encoder-decoder model; lowbit compiles decoder-only causal LMs and encoders")
    if any(str(n).endswith("ForConditionalGeneration") for n in names) and task_of(config) != "causal-lm":
        raise LowbitError(f"{arch} is a vision-language or sequence-to-sequence model; lowbit compiles decoder-only "
                          "causal LMs (a *ForCausalLM checkpoint) and encoders")
    moe = [f for f in MOE_FIELDS if (getattr(config, f, None) or 0) > 1]
    if moe:
        raise LowbitError(f"{arch} is a mixture-of-experts model ({moe[0]}={getattr(config, moe[0])}); lowbit does "
                          "not compile routed experts yet")
    model_class(config)                       # a task transformers has no class for fails here, in one line
    return config


def task_of(config) -> str:
    """'causal-lm' when the checkpoint names a causal-LM head (or, without names, its model type has a causal LM
    and no masked LM), else 'encoder'."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    names = getattr(config, "architectures", None) or []
    if names:
        return "causal-lm" if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) else "encoder"
    mt = config.model_type
    return "causal-lm" if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES \
        else "encoder"


def model_class(config):
    """The transformers class that builds this config's model for its task (causal LM, or the bare encoder)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task_of(config) == "causal-lm" else AutoModel
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        arch = ",".join(getattr(config, "architectures", None) or []) or config.model_type
        raise LowbitError(f"transformers has no {'causal-LM' if auto is AutoModelForCausalLM else 'base'} model "
                          f"class for {arch} (model_type={config.model_type!r})") from None


def attn_implementation(config) -> str:
    """'sdpa' where the model class supports it (one fused attention op in the traced graph), else 'eager'."""
    return "sdpa" if getattr(model_class(config), "_supports_sdpa", False) else "eager"


def load_model(arg: str, dtype=torch.float32) -> LoadedModel:
    """Load a model folder (or 'demo') with its tokenizer, in eval mode on CPU."""
    quiet_transformers()
    path = resolve_model_path(arg)
    config = read_config(path)
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise LowbitError(f"'{path}' has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                          "pass a complete model folder")
    task = task_of(config)
    try:
        model = model_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                    attn_implementation=attn_implementation(config)).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
    check_finite(model)
    return LoadedModel(model, load_tokenizer(path), config, path, task)


def check_finite(model: torch.nn.Module) -> None:
    """Refuse a model with a NaN or Inf weight, naming the first such parameter: caught here, it would otherwise
    surface later as a confusing failure (the decode check, a NaN perplexity). Counting runs only on failure."""
    bad = [(name, p) for name, p in model.named_parameters() if not _finite(p)]
    if not bad:
        return
    name, p = bad[0]
    more = f" (and {len(bad) - 1} more weight tensors hold NaN or Inf)" if len(bad) > 1 else ""
    raise LowbitError(f"model weight {name} holds {_non_finite_counts(p)}{more}; the checkpoint is corrupted "
                      "(re-download or re-convert it)")


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite. A NaN or Inf makes the sum non-finite, so one reduction clears almost
    every tensor (5x faster than isfinite on CPU); isfinite settles the rest, whose sum may only have overflowed."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _non_finite_counts(t: torch.Tensor) -> str:
    """'12 NaN values', '1 Inf value' or '3 NaN and 2 Inf values' for a tensor known to hold some."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
    return " and ".join(parts) + (" value" if nan + inf == 1 else " values")


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
    from lowbit.compiler import hf_attention

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


def trace(loaded: LoadedModel) -> Graph:
    """torch.export the model's step (causal LMs) or forward (encoders), every dimension dynamic; the IR Graph."""
    from torch.export import Dim

    quiet_transformers()
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
    if kv is not None:
        err = _decode_check(graph)
        if err is not None:
            arch = ",".join(getattr(loaded.config, "architectures", None) or [loaded.model_type])
            raise LowbitError(f"architecture {arch}: the traced step does not serve one-token decode ({err})")
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


def _decode_check(graph: Graph):
    """None when the traced step also serves one-token decode, else why not: a prefill of 7 tokens then a
    one-token step over its cache must give the logits of a prefill of all 8 (the step path the tracer did not
    see against the one it did)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, max(graph.vocab_size, 1), (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    try:
        with torch.no_grad():
            full = graph.gm(*graph.step_args(ids, mask))[0][:, -1]
            prefix = graph.gm(*graph.step_args(ids[:, :-1], mask[:, :-1]))
            step = graph.gm(*graph.step_args(ids[:, -1:], mask, prefix[1:]))[0][:, -1]
    except Exception as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    err = float((step - full).abs().max() / full.abs().max().clamp_min(1e-6))
    return None if err < 1e-4 else f"a one-token step differs from the prefill by {err:.1e} (relative)"


def hash_model_folder(path: Path) -> str:
    """sha256 over the folder's config and weight files (names and bytes), the artifact's source id."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()
