"""``genai_config.json`` for an ONNX artifact of a causal LM, so onnxruntime-genai runs it as it is
(``og.Model(artifact_dir)``): the decoder's file and input/output names, its attention shape, the context
length and special tokens, greedy search by default.

``past_present_share_buffer`` is true when every layer's attention is ``GroupQueryAttention``
(``ort_attention.py``), which writes the new keys / values into onnxruntime-genai's max-length buffers in place;
a graph that concatenates its cache (``present`` = past + new) gets false. The graph takes ``position_ids``.
onnxruntime-genai reads the tokenizer from the config's folder: ``tokenizer.json`` and ``tokenizer_config.json``
are copied next to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# transformers model_type -> onnxruntime-genai model type; any other decoder runs as the generic "llama" type,
# which these graphs need nothing model-specific from (they take positions and the whole cache as inputs).
GENAI_TYPES = {t: t for t in ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite",
                              "olmo", "nemotron", "smollm3", "chatglm", "gptj")}


def why_not(kv: list, tokenizer_dir: Path) -> Optional[str]:
    """Why onnxruntime-genai cannot run this decoder, or None."""
    if len({(h, dk, dv) for h, dk, dv in kv}) != 1 or kv[0][1] != kv[0][2]:
        return "its layers' K/V shapes differ (onnxruntime-genai takes one head count and head size)"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return "it has no tokenizer.json (onnxruntime-genai reads only that form)"
    return None


def write_genai_config(dest: Path, config, kv: list, onnx_file: str, inputs: list[str], max_positions: int,
                       eos_ids: list[int], in_place_cache: bool = False) -> dict:
    """Write ``dest/genai_config.json`` (+ the tokenizer files from ``dest/tokenizer``); the manifest's entry.
    ``in_place_cache``: the graph's attention writes its cache in place (GroupQueryAttention in every layer)."""
    why = why_not(kv, dest / "tokenizer")
    if why is not None:
        return {"written": False, "reason": why}
    heads, head_dim, _ = kv[0]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text, "pad_token_id", None)
    model_type = GENAI_TYPES.get(text.model_type, "llama")
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    doc = {"model": {
        "bos_token_id": getattr(text, "bos_token_id", None) or 0,
        "context_length": max_positions,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": onnx_file,
            "head_size": head_dim,
            "hidden_size": text.hidden_size,
            "inputs": {k: v for k, v in names.items() if "%d" in v or v in inputs},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": text.num_attention_heads,
            "num_hidden_layers": len(kv),
            "num_key_value_heads": heads},
        "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
        "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else 0),
        "type": model_type,
        "vocab_size": text.vocab_size},
        "search": {"do_sample": False, "max_length": max_positions, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": in_place_cache, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0}}
    (dest / GENAI_CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    for name in TOKENIZER_FILES:
        if (dest / "tokenizer" / name).is_file():
            shutil.copyfile(dest / "tokenizer" / name, dest / name)
    return {"written": True, "file": GENAI_CONFIG_FILE, "type": model_type, "in_place_cache": in_place_cache}
