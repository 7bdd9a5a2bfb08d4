"""Generation settings (their accepted ranges, checked once where they enter: the CLI, the engines, the server)
and the sampler that turns one sequence's logits into its next token, in numpy.

The order is transformers' and vLLM's: penalties on the raw logits, then temperature, top-k, top-p, min-p. The
repetition penalty counts the prompt and the generated tokens; presence and frequency penalties (OpenAI's) count
the generated tokens only. Greedy decoding takes the argmax after the penalties.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from lowbit.errors import LowbitError

MAX_STOPS = 16


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class GenerationSettings:
    """How one prompt is continued. Built from keywords (``GenerationSettings(**kw)``), refused in one line
    naming the first setting out of its range."""

    max_new_tokens: int = 32
    do_sample: bool = False           # False: greedy (the argmax after the penalties)
    temperature: float = 1.0
    top_k: int = 0                    # 0: no top-k cut
    top_p: float = 1.0                # 1: no nucleus cut
    min_p: float = 0.0                # 0: no min-p cut (tokens below min_p x the likeliest's probability)
    repetition_penalty: float = 1.0   # 1: off; > 1 discourages every token already in the prompt or the output
    presence_penalty: float = 0.0     # subtracted once from each token already generated
    frequency_penalty: float = 0.0    # subtracted per occurrence of each token already generated
    seed: Optional[int] = None        # sequence i of a call samples from numpy's generator seeded [seed, i]
    stop: tuple = ()                  # strings that end the text (not included in it)
    stop_at_eos: bool = True          # False: ignore end-of-sequence tokens, always make max_new_tokens

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()))
        check(self)

    @classmethod
    def of(cls, settings: Optional["GenerationSettings"] = None, **kw) -> "GenerationSettings":
        """``settings`` with the keywords given replaced; unknown keywords refused in one line."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise LowbitError(f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        base = {f.name: getattr(settings, f.name) for f in fields(cls)} if settings is not None else {}
        return cls(**{**base, **kw})


def check(s: GenerationSettings) -> None:
    """A one-line LowbitError naming the first setting outside its range. Temperature only divides the logits
    when sampling, so greedy decoding also takes 0 (the usual spelling of "greedy")."""
    if not _is_int(s.max_new_tokens) or s.max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens (-n) must be an integer at least 1, got {s.max_new_tokens!r}")
    if not isinstance(s.do_sample, bool):
        raise LowbitError(f"do_sample must be true or false, got {s.do_sample!r}")
    if not (_is_number(s.temperature) and (s.temperature > 0 if s.do_sample else s.temperature >= 0)):
        low = "> 0 when sampling" if s.do_sample else ">= 0"
        raise LowbitError(f"temperature must be a finite number {low}, got {s.temperature!r}")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise LowbitError(f"top_k (--top-k) must be an integer at least 0 (0: no top-k cut), got {s.top_k!r}")
    if not _is_number(s.top_p) or not 0 < s.top_p <= 1:
        raise LowbitError(f"top_p (--top-p) must be a number in 0 < top_p <= 1 (1: no nucleus cut), got {s.top_p!r}")
    if not _is_number(s.min_p) or not 0 <= s.min_p <= 1:
        raise LowbitError(f"min_p (--min-p) must be a number in 0 <= min_p <= 1 (0: no cut), got {s.min_p!r}")
    if not _is_number(s.repetition_penalty) or s.repetition_penalty <= 0:
        raise LowbitError(f"repetition_penalty (--repetition-penalty) must be a number > 0 (1: off), got "
                          f"{s.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not _is_number(value) or not -2 <= value <= 2:
            flag = "--" + name.replace("_", "-")
            raise LowbitError(f"{name} ({flag}) must be a number in -2 <= {name} <= 2 (0: off), got {value!r}")
    if s.seed is not None and (not _is_int(s.seed) or not 0 <= s.seed < 2 ** 64):
        raise LowbitError(f"seed must be an integer in 0 <= seed < 2**64, got {s.seed!r}")
    if len(s.stop) > MAX_STOPS or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in s.stop):
        raise LowbitError(f"stop (--stop) must be at most {MAX_STOPS} non-empty strings of at most 256 characters "
                          "each")
    if not isinstance(s.stop_at_eos, bool):
        raise LowbitError(f"stop_at_eos must be true or false, got {s.stop_at_eos!r}")


def sequence_rng(seed: Optional[int], index: int) -> np.random.Generator:
    """The random stream of sequence ``index`` of a call: its own, so a sequence samples the same tokens whatever
    else runs beside it (another batch, a server's other requests)."""
    return np.random.default_rng(None if seed is None else [seed, index])


class Sampler:
    """The next token of one sequence from its logits [V]: ``pick(logits, prompt, generated)``."""

    def __init__(self, settings: GenerationSettings, index: int = 0):
        self.s = settings
        self.rng = sequence_rng(settings.seed, index)

    def penalize(self, logits: np.ndarray, prompt: np.ndarray, generated: np.ndarray) -> np.ndarray:
        s = self.s
        if s.repetition_penalty == 1 and s.presence_penalty == 0 and s.frequency_penalty == 0:
            return logits
        logits = logits.astype(np.float64)
        if s.repetition_penalty != 1:
            seen = np.unique(np.concatenate([prompt, generated]))
            seen = seen[(seen >= 0) & (seen < logits.shape[-1])]
            x = logits[seen]
            logits[seen] = np.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)
        if (s.presence_penalty or s.frequency_penalty) and len(generated):
            counts = np.bincount(generated[(generated >= 0) & (generated < logits.shape[-1])],
                                 minlength=logits.shape[-1])
            logits -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0)
        return logits

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampled from after temperature and the cuts (float64 [V], zeros outside the cuts)."""
        s = self.s
        x = logits.astype(np.float64) / s.temperature
        vocab = x.shape[-1]
        if 0 < s.top_k < vocab:
            kth = np.partition(x, vocab - s.top_k)[vocab - s.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if s.top_p < 1:
            p = nucleus(p, s.top_p)
        if s.min_p > 0:
            p = np.where(p < s.min_p * p.max(), 0.0, p)
            p /= p.sum()
        return p

    def pick(self, logits: np.ndarray, prompt: np.ndarray, generated: np.ndarray) -> int:
        logits = self.penalize(logits, prompt, generated)
        if not self.s.do_sample:
            return int(np.argmax(logits))
        cdf = np.cumsum(self.probabilities(logits))
        # One uniform draw per token: inverse transform sampling on the cumulative distribution.
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """``p`` cut to its nucleus (the likeliest tokens whose mass first reaches ``top_p``; always the first one),
    renormalised. Sorts only as many of the likeliest tokens as the nucleus can need: top candidates by partition,
    doubled until their mass reaches ``top_p``."""
    k = min(256, p.size)
    while True:
        top = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        if k == p.size or p[top].sum() >= top_p:
            break
        k = min(2 * k, p.size)
    order = top[np.argsort(-p[top], kind="stable")]
    sorted_p = p[order]
    keep = np.cumsum(sorted_p) - sorted_p < top_p          # the tokens before which the mass was short of top_p
    out = np.zeros_like(p)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the model's own distribution (the raw logits' log-softmax, before
    any penalty or cut: what OpenAI's and vLLM's ``logprobs`` report), and the ``top`` likeliest tokens' (id,
    log-probability), likeliest first."""
    x = logits.astype(np.float64)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    best = np.argpartition(-lp, top - 1)[:top] if 0 < top < len(lp) else np.arange(len(lp) if top else 0)
    best = best[np.argsort(-lp[best], kind="stable")]
    return float(lp[token]), [(int(i), float(lp[i])) for i in best]
