"""``lowbit eval``: perplexity of an artifact or a model folder (the protocol in ``lowbit.metrics``), and the
sentence-embedding similarity of an encoder artifact to its float source."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.metrics import perplexity, read_text, windows
from lowbit.progress import progress_bar


def scorer(target: str, backend: str = "auto", provider: str = "auto", device: str = "cpu", dtype=None,
           kernels: str = "auto"):
    """(logits_fn, tokenizer, max_positions, label) for an artifact folder or a model folder / 'demo'; the model
    runs on ``device`` in ``dtype`` (see ``Engine.load``)."""
    from lowbit.format.artifact import is_artifact

    if target != "demo" and is_artifact(target):
        from lowbit.runtime.engine import Engine

        eng = Engine.load(target, backend=backend, provider=provider, device=device, dtype=dtype, kernels=kernels)
        if eng.task != "causal-lm":
            raise LowbitError(f"perplexity needs a causal LM; '{target}' is an encoder (use --embeddings TEXT)")
        if eng.tokenizer is None:
            raise LowbitError(f"artifact '{target}' has no tokenizer; cannot tokenize text")
        return (lambda ids: eng.forward(ids)), eng.tokenizer, eng.max_positions, f"artifact {target}"
    from lowbit.frontend.load import load_model
    from lowbit.device import pick_device, pick_dtype

    if backend != "auto":
        raise LowbitError(f"--backend {backend} applies to compiled artifacts; '{target}' is a model folder")
    device = pick_device(device)          # a bad --device/--dtype fails before the model loads
    dtype = pick_dtype(dtype, device)
    loaded = load_model(target)
    if loaded.task != "causal-lm":
        raise LowbitError(f"perplexity needs a causal LM; '{target}' is an encoder")
    if loaded.tokenizer is None:
        raise LowbitError(f"model folder '{target}' has no tokenizer; cannot tokenize text")
    model = loaded.model.to(device, dtype)
    return (lambda ids: model(input_ids=ids.to(device), use_cache=False).logits), loaded.tokenizer, \
        loaded.max_positions, f"model {target}"


def evaluate_perplexity(target: str, text: str, seq_len: int = 512, max_windows: Optional[int] = None,
                        batch_size: int = 1, show_progress: bool = True, backend: str = "auto",
                        provider: str = "auto", device: str = "cpu", dtype=None, kernels: str = "auto") -> dict:
    text = read_text(text)               # cheap checks first: a missing file fails before a model loads
    fn, tok, max_pos, _ = scorer(target, backend, provider, device, dtype, kernels)
    if max_pos and seq_len > max_pos:
        raise LowbitError(f"--seq-len {seq_len} is longer than the model's context of {max_pos} tokens")
    wins = windows(tok, text, seq_len, max_windows)
    result = perplexity(fn, wins, batch_size, show_progress)
    result["seq_len"] = seq_len
    return result


def sentences(text: str, limit: Optional[int] = None, min_words: int = 5, max_words: int = 64) -> list[str]:
    """Sentences of a text (split after . ! ? and at line ends), 5 to 64 words each, in order."""
    import re

    out = []
    for line in text.splitlines():
        for s in re.split(r"(?<=[.!?])\s+", line.strip()):
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
                if limit and len(out) >= limit:
                    return out
    return out


@torch.inference_mode()
def evaluate_embeddings(target: str, text: str, max_sentences: int = 256, batch_size: int = 32,
                        show_progress: bool = True, backend: str = "auto", provider: str = "auto",
                        device: str = "cpu", dtype=None, kernels: str = "auto") -> dict:
    """Mean cosine similarity between an encoder artifact's sentence embeddings (mean pooling) and those of
    its float source model, over the sentences of ``text``."""
    from lowbit.format.artifact import is_artifact
    from lowbit.frontend.load import load_model
    from lowbit.runtime.engine import Engine

    body = read_text(text)
    if not is_artifact(target):
        raise LowbitError(f"--embeddings compares a compiled encoder with its float source; '{target}' is not an "
                          "artifact (compile it first)")
    eng = Engine.load(target, backend=backend, provider=provider, device=device, dtype=dtype, kernels=kernels)
    if eng.task != "encoder":
        raise LowbitError(f"--embeddings needs an encoder artifact; '{target}' is a causal LM (use --text for "
                          "perplexity)")
    source = eng.manifest["source"]["path"]
    if not Path(source).is_dir():
        raise LowbitError(f"the artifact's float source model '{source}' is gone; --embeddings compares against it")
    sents = sentences(body, max_sentences)
    if not sents:
        raise LowbitError("the text has no sentences of 5 to 64 words; give a longer text")
    ref_model = load_model(source).model
    cos = []
    from lowbit.runtime.engine import mean_pool

    for i in progress_bar(range(0, len(sents), batch_size), desc="embed", disable=not show_progress):
        enc = eng.tokenizer(sents[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
        q = mean_pool(eng.forward(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
        f = mean_pool(ref_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state,
                      enc["attention_mask"])
        cos.append(F.cosine_similarity(q.float(), f.float(), dim=-1))
    c = torch.cat(cos)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "sentences": len(sents)}
