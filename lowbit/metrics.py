"""Text windows and perplexity: what the compiler's --eval and ``lowbit eval`` both compute.

Perplexity protocol (kept simple so anyone can reproduce it with plain transformers): tokenize the whole
text once without special tokens, cut it into consecutive non-overlapping windows of ``seq_len`` tokens
(the tail shorter than a window is dropped), score every window independently, predict tokens 2..seq_len
of each window, and report exp(mean negative log-likelihood) over all predicted tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lowbit.progress import progress_bar
from lowbit.errors import LowbitError


def read_text(arg: str, which: str = "eval") -> str:
    """Text from a file, or the demo split ('demo' -> eval.txt / calib.txt)."""
    if arg == "demo":
        from lowbit.demo.assets import ensure_assets

        arg = ensure_assets()[which]
    path = Path(arg)
    if not path.is_file():
        raise LowbitError(f"text file '{arg}' does not exist; pass a UTF-8 text file or 'demo'")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"text file '{arg}' is not UTF-8 text") from None


def windows(tokenizer, text: str, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """[W, seq_len] token windows; a clear error when the text is too short for one."""
    if seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0] if text.strip() else torch.empty(0, dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise LowbitError(f"text has {ids.numel()} tokens, too short for one window of --seq-len {seq_len}; "
                          "give a longer text or a smaller --seq-len")
    if max_windows is not None and max_windows > 0:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], wins: torch.Tensor, batch_size: int = 1,
               show_progress: bool = True) -> dict:
    """{'ppl', 'tokens', 'windows', 'nll'} for ``logits_fn(ids [B, T]) -> logits [B, T, V]``."""
    nll, count = 0.0, 0
    for i in progress_bar(range(0, wins.shape[0], batch_size), desc="ppl", disable=not show_progress):
        batch = wins[i:i + batch_size]
        logits = logits_fn(batch).float()
        targets = batch[:, 1:].to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": int(wins.shape[0]), "nll": nll / count}
