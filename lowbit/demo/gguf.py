"""The demo LM: SmolLM2's GGUF (dequantized by transformers) saved as a plain fp32 safetensors folder, checked
to give the same tokens and logits as the GGUF-loaded model."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

# A fixed sentence whose logits must survive the GGUF -> safetensors round trip bit for bit.
_CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog, and the capital of France is Paris."


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _drop_quantization(model)
        # The GGUF carries no max length, so the tokenizer would say "unlimited"; use the model's context.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _scrub_config_file(out / "config.json")
        _check_round_trip(model, tokenizer, out)


def _drop_quantization(model) -> None:
    """Make the dequantized model an ordinary fp32 model, which save_pretrained then accepts.

    transformers dequantizes this GGUF to plain fp32 tensors but still tags the model as GGUF-quantized,
    and refuses to save a model so tagged; the tag is all there is to remove.
    """
    import torch

    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    dtypes = {p.dtype for p in model.parameters()}
    if packed or dtypes != {torch.float32}:
        raise RuntimeError(f"GGUF load kept packed weights ({packed}, {dtypes}); expected a dequantized fp32 model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for obj, attr in ((model.config, "quantization_config"), (model, "hf_quantizer")):
        if hasattr(obj, attr):
            delattr(obj, attr)
    model.config._is_quantized = False


def _scrub_config_file(config_json: Path) -> None:
    """Ensure the saved config has no quantization_config, else from_pretrained would look for GGUF again."""
    config = json.loads(config_json.read_text(encoding="utf-8"))
    if "quantization_config" in config:
        del config["quantization_config"]
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_round_trip(gguf_model, tokenizer, out: Path) -> None:
    """Reload the saved folder the plain way and demand the very same logits: cheap, and catches a bad save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise RuntimeError("saved SmolLM2 config still carries a quantization_config")
    ids = AutoTokenizer.from_pretrained(out)(_CHECK_SENTENCE, return_tensors="pt").input_ids
    if not torch.equal(ids, tokenizer(_CHECK_SENTENCE, return_tensors="pt").input_ids):
        raise RuntimeError("saved SmolLM2 tokenizer tokenizes differently from the GGUF one")
    with torch.no_grad():
        expected = gguf_model.eval()(ids).logits
        got = reloaded.eval()(ids).logits
    if not torch.equal(expected, got):
        raise RuntimeError("saved SmolLM2 weights give different logits from the GGUF-loaded model")


@contextlib.contextmanager
def _quiet_transformers():
    """Our one line per step says what is happening; transformers' bars and warnings would only add noise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The legacy GGUF loader draws its own tqdm bar, which ignores the switch above.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
