"""The accepted ranges of the generation settings, checked once where they enter (the CLI, the engines)."""

from __future__ import annotations

import math
import numbers

from lowbit.errors import LowbitError


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_sampling(max_new_tokens, do_sample: bool, temperature, top_k, top_p):
    """A one-line LowbitError naming the first setting outside its range. Temperature only divides the logits
    when sampling, so greedy decoding also takes 0 (the usual spelling of "greedy")."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens (-n) must be an integer at least 1, got {max_new_tokens!r}")
    if not (_is_number(temperature) and math.isfinite(temperature)
            and (temperature > 0 if do_sample else temperature >= 0)):
        low = "> 0 when sampling" if do_sample else ">= 0"
        raise LowbitError(f"temperature must be a finite number {low}, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise LowbitError(f"top_k (--top-k) must be an integer at least 0 (0: no top-k cut), got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise LowbitError(f"top_p (--top-p) must be a number in 0 < top_p <= 1 (1: no nucleus cut), got {top_p!r}")
