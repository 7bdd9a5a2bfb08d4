"""The one generation loop and sampler every runtime path shares (the torch Engine on any backend, the torch-free
LiteEngine): numpy in and out, so the same seed picks the same tokens everywhere.

A backend gives ``step(ids, mask, positions, cache) -> (logits of each row's last position [B, V], cache)`` and
``start(batch, capacity) -> cache``; the loop does one prefill, then one cached step per new token, from
left-padded ids.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.sampling import check_sampling


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of left-padded rows: 0 at each row's first real token (``format.program.mask_positions``)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def pick_next(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
              rng: np.random.Generator) -> np.ndarray:
    """Greedy argmax, or sampling with temperature / top-k / top-p (nucleus) from ``rng``: int64 [B]."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    logits = logits.astype(np.float64) / temperature
    if top_k and top_k > 0:
        kth = np.sort(logits, -1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, -1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p >= top_p      # keeps the first token always
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_p), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


def generate(step: Callable, start: Callable, input_ids, attention_mask, max_new_tokens: int, max_positions: int,
             eos: list, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, stop_at_eos: bool = True) -> np.ndarray:
    """Token ids int64 [B, T + new]: the prompt, then up to ``max_new_tokens`` tokens per row (rows that reached an
    end-of-sequence id are padded with it until all have, when ``stop_at_eos``)."""
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    if ids.shape[1] + max_new_tokens > max_positions:
        raise LowbitError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {max_positions} tokens; shorten the prompt or generate fewer tokens")
    rng = np.random.default_rng(seed)
    positions = mask_positions(mask)
    cache = start(ids.shape[0], ids.shape[1] + max_new_tokens)
    logits, cache = step(ids, mask, positions, cache)
    out, done = ids, np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        nxt = pick_next(logits, do_sample, temperature, top_k, top_p, rng)
        if eos and stop_at_eos:
            nxt = np.where(done, eos[0], nxt)
            done |= np.isin(nxt, eos)
        out = np.concatenate([out, nxt[:, None]], axis=1)
        if stop_at_eos and eos and done.all():
            break
        mask = np.concatenate([mask, np.ones_like(nxt[:, None])], axis=1)
        positions = positions[:, -1:] + 1
        logits, cache = step(nxt[:, None], mask, positions, cache)
    return out
