"""The one generation loop every runtime path shares (the torch Engine on any backend, the torch-free LiteEngine,
the server's batcher): numpy in and out, so the same seed picks the same tokens everywhere.

A backend gives ``step(ids, mask, positions, cache) -> (logits of each row's last position [B, V], cache)`` and
``start(batch, capacity) -> cache``; the loop does one prefill, then one cached step per new token, from
left-padded ids. Each row is a ``Sequence``: its own sampler and random stream, its tokens, its text (pieces
from ``detokenize``) and why it finished.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence as Seq

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.detokenize import StopMatcher, TextDecoder
from lowbit.runtime.sampling import GenerationSettings, Sampler


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of left-padded rows: 0 at each row's first real token (``format.program.mask_positions``)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def pad_rows(rows: Seq[Seq[int]], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) int64 [B, T] of token rows padded on ``side`` to the longest."""
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def check_context(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    if prompt_tokens + max_new_tokens > max_positions:
        raise LowbitError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {max_positions} tokens; shorten the prompt or generate fewer tokens")


class Sequence:
    """One prompt being continued: ``next_token(logits)``, then ``push(token) -> new text``, until
    ``finish_reason`` is set: "stop" (an end-of-sequence token or a stop string) or "length" (max_new_tokens)."""

    def __init__(self, prompt: Seq[int], settings: GenerationSettings, eos: Seq[int], index: int = 0,
                 decode: Optional[Callable[[list], str]] = None):
        self.prompt = np.asarray(prompt, np.int64)
        self.settings = settings
        self.sampler = Sampler(settings, index)
        self.eos = frozenset(int(e) for e in eos) if settings.stop_at_eos else frozenset()
        if settings.stop and decode is None:
            raise LowbitError("stop strings need the artifact's tokenizer to read the text; use end-of-sequence ids")
        self.text = TextDecoder(decode, self.prompt.tolist()) if decode else None
        self.stops = StopMatcher(settings.stop)
        self.tokens: list[int] = []
        self.finish_reason: Optional[str] = None

    def next_token(self, logits: np.ndarray) -> int:
        return self.sampler.pick(logits, self.prompt, np.asarray(self.tokens, np.int64))

    def push(self, token: int) -> str:
        """Record the token; returns the text it completes (empty when none is ready)."""
        self.tokens.append(int(token))
        if token in self.eos:
            self.finish_reason = "stop"
            return self._finish("")
        piece = self.text.add(token) if self.text else ""
        piece, stopped = self.stops.feed(piece)
        if stopped:
            self.finish_reason = "stop"
            return piece
        if len(self.tokens) >= self.settings.max_new_tokens:
            self.finish_reason = "length"
            return self._finish(piece)
        return piece

    def _finish(self, piece: str) -> str:
        if self.text is None:
            return piece
        tail, stopped = self.stops.feed(self.text.flush())
        if stopped:
            self.finish_reason = "stop"
            return piece + tail
        return piece + tail + self.stops.flush()


def run(step: Callable, start: Callable, ids: np.ndarray, mask: np.ndarray, seqs: list[Sequence],
        max_positions: int, pad_id: int = 0) -> Iterator[list[tuple[int, int, str]]]:
    """The static batch loop: after each decode step, ``(row, token, new text)`` for each row that picked one.
    Rows that finished feed ``pad_id`` until every row has."""
    ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
    longest = max(s.settings.max_new_tokens for s in seqs)
    check_context(ids.shape[1], longest, max_positions)
    positions = mask_positions(mask)
    cache = start(ids.shape[0], ids.shape[1] + longest)
    logits, cache = step(ids, mask, positions, cache)
    while True:
        events, nxt = [], np.full(len(seqs), pad_id, np.int64)
        for row, s in enumerate(seqs):
            if s.finish_reason is None:
                nxt[row] = s.next_token(logits[row])
                events.append((row, int(nxt[row]), s.push(int(nxt[row]))))
        yield events
        if all(s.finish_reason for s in seqs):
            return
        mask = np.concatenate([mask, np.ones((len(seqs), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, cache = step(nxt[:, None], mask, positions, cache)


def generate(step: Callable, start: Callable, input_ids, attention_mask, settings: GenerationSettings,
             max_positions: int, eos: list, decode: Optional[Callable] = None) -> np.ndarray:
    """Token ids int64 [B, T + new]: the prompt, then each row's new tokens; rows that finished first are padded
    with the first end-of-sequence id (0 when there is none)."""
    ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    seqs = [Sequence(row[m.astype(bool)], settings, eos, i, decode) for i, (row, m) in enumerate(zip(ids, mask))]
    pad = int(eos[0]) if eos else 0
    for _ in run(step, start, ids, mask, seqs, max_positions, pad):
        pass
    new = pad_rows([s.tokens for s in seqs], pad, side="right")[0]
    return np.concatenate([ids, new], axis=1)
