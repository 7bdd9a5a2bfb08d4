"""Frontend, loading: a transformers model from a local folder (or the word ``demo``), refused with one line when
lowbit cannot compile it. Only local folders are accepted: lowbit never downloads, and never runs a folder's own
code (``trust_remote_code=False`` everywhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

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

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception:  # a folder without tokenizer files is still a model; callers that need one say so
        return None


@contextlib.contextmanager
def quiet_transformers():
    """transformers is chatty (per-weight progress bars, config warnings) and lowbit prints its own progress: quiet
    while lowbit calls it, then as the caller had it (a library leaves logging and warnings alone)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    export_log = logging.getLogger("torch._export")
    level = export_log.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    export_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch._export")
            warnings.filterwarnings("ignore", module="transformers")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        export_log.setLevel(level)


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
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
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
    path = resolve_model_path(arg)
    config = read_config(path)
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise LowbitError(f"'{path}' has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                          "pass a complete model folder")
    task = task_of(config)
    try:
        with quiet_transformers():
            model = model_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                        local_files_only=True,
                                                        attn_implementation=attn_implementation(config)).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
    check_finite(model)
    return LoadedModel(model, load_tokenizer(path), config, path, task)


def round_weights(model: torch.nn.Module, precision: Optional[torch.dtype]) -> None:
    """Round ``model``'s float weights (what its checkpoint holds) in place to values ``precision`` holds, as if
    the checkpoint were stored in it: the compile's ``--dtype`` (``CheckpointWeights.precision`` when it streams)."""
    from lowbit.frontend.weights import in_precision

    if precision is None:
        return
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and t.dtype != precision:
            t.data.copy_(in_precision(t.data, precision, name))


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


FINITE_CHUNK = 1 << 24         # values summed at a time: a float32 sum of a bfloat16 tensor converts it whole


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite. A NaN or Inf makes the sum non-finite, so one reduction clears almost
    every chunk (5x faster than isfinite on CPU); isfinite settles the rest, whose sum may only have overflowed.
    Chunks bound the float32 copy a half-precision sum makes (a vocabulary table: 2 GiB at Llama-3-8B's)."""
    return all(bool(torch.isfinite(c.sum(dtype=torch.float32))) or bool(torch.isfinite(c).all())
               for c in t.reshape(-1).split(FINITE_CHUNK))


def _non_finite_counts(t: torch.Tensor) -> str:
    """'12 NaN values', '1 Inf value' or '3 NaN and 2 Inf values' for a tensor known to hold some."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
    return " and ".join(parts) + (" value" if nan + inf == 1 else " values")



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
