"""Frontend: load a transformers model from a local folder and trace it to the graph IR.

Only local folders (or the word ``demo``) are accepted: lowbit never downloads. Tracing uses
``torch.export`` with dynamic batch and sequence dimensions, so one graph serves every input shape.
"""

from __future__ import annotations

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

CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "phi3", "gemma")
ENCODER_TYPES = ("bert",)
SUPPORTED = CAUSAL_LM_TYPES + ENCODER_TYPES
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


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path)
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
        from lowbit.assets import ensure_assets

        return Path(ensure_assets()["model" if arg == "demo" else "encoder"])
    path = Path(arg).expanduser()
    if not path.exists():
        raise LowbitError(f"model path '{arg}' does not exist; pass a local transformers model folder, 'demo' or 'demo-encoder'")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LowbitError(f"'{arg}' is not a transformers model folder (no config.json); "
                          "pass a folder written by save_pretrained() or 'demo'")
    return path


def read_config(path: Path):
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"cannot read {path / 'config.json'}: {e}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        arch = ",".join(raw.get("architectures") or []) or "unknown"
        raise LowbitError(f"unsupported architecture {arch} (model_type={model_type!r}); lowbit supports "
                          f"model types: {', '.join(SUPPORTED)}")
    return AutoConfig.from_pretrained(path)


def task_of(config) -> str:
    return "encoder" if config.model_type in ENCODER_TYPES else "causal-lm"


def build_empty(config, dtype=torch.float32) -> torch.nn.Module:
    """An architecture instance from a config (weights to be loaded by the caller)."""
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    cls = AutoModel if task_of(config) == "encoder" else AutoModelForCausalLM
    config._attn_implementation = "sdpa"
    return cls.from_config(config, dtype=dtype).eval()


def load_model(arg: str, dtype=torch.float32) -> LoadedModel:
    """Load a model folder (or 'demo') with its tokenizer, in eval mode on CPU."""
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model_path(arg)
    config = read_config(path)
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise LowbitError(f"'{path}' has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                          "pass a complete model folder")
    task = task_of(config)
    cls = AutoModel if task == "encoder" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
    return LoadedModel(model, load_tokenizer(path), config, path, task)


class _TraceRoot(torch.nn.Module):
    """Wraps the HF model so the traced graph takes tensors and returns one tensor."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.hf = model
        self.task = task

    def forward(self, input_ids, attention_mask):
        if self.task == "encoder":
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def trace(loaded: LoadedModel) -> Graph:
    """torch.export the model with dynamic batch and sequence; returns the IR Graph."""
    from torch.export import Dim

    quiet_transformers()
    max_len = loaded.max_positions
    seq = min(16, max_len)
    ids = torch.randint(0, int(loaded.config.vocab_size), (2, seq))
    mask = torch.ones_like(ids)
    batch_dim = Dim("batch", max=4096)
    seq_dim = Dim("seq", min=2, max=max(3, max_len))
    shapes = ({0: batch_dim, 1: seq_dim}, {0: batch_dim, 1: seq_dim})
    root = _TraceRoot(loaded.model, loaded.task).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(root, (ids, mask), dynamic_shapes=shapes, strict=False)
    except Exception as e:
        arch = ",".join(getattr(loaded.config, "architectures", None) or [loaded.model_type])
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LowbitError(f"cannot trace architecture {arch} with torch.export ({msg}); supported model "
                          f"types: {', '.join(SUPPORTED)}") from None
    graph = Graph(ep.module(), loaded.model_type, loaded.task)
    emb = loaded.model.get_input_embeddings()
    graph.input_embedding = next((n for n, m in loaded.model.named_modules() if m is emb), None)
    return graph


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
