"""The shared sampler (runtime/generation.py): greedy is the argmax, the cuts keep what they promise, a seed
reproduces, and samples follow the softmax of the logits."""

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.runtime.generation import generate, pick_next


def logits(seed=0, batch=3, vocab=50):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * 3


def test_greedy_and_degenerate_cuts_are_the_argmax():
    x = logits()
    rng = np.random.default_rng(0)
    assert (pick_next(x, False, 1.0, 0, 1.0, rng) == x.argmax(-1)).all()
    assert (pick_next(x, True, 1.0, 1, 1.0, rng) == x.argmax(-1)).all()          # top-k 1
    assert (pick_next(x, True, 1.0, 0, 1e-9, rng) == x.argmax(-1)).all()         # nucleus of one token


def test_seed_reproduces_and_cuts_hold():
    x = logits(1)
    a = [pick_next(x, True, 1.0, 5, 0.9, np.random.default_rng(3)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    top5 = np.argsort(-x, -1)[:, :5]
    rng = np.random.default_rng(4)
    for _ in range(50):
        picked = pick_next(x, True, 2.0, 5, 1.0, rng)
        assert all(p in row for p, row in zip(picked, top5))


def test_samples_follow_the_softmax():
    x = logits(2, batch=1, vocab=6)
    rng = np.random.default_rng(5)
    counts = np.bincount([int(pick_next(x, True, 1.0, 0, 1.0, rng)[0]) for _ in range(4000)], minlength=6) / 4000
    p = np.exp(x[0] - x[0].max())
    p /= p.sum()
    assert np.abs(counts - p).max() < 0.03
    assert np.abs(counts - np.roll(p, 1)).max() > 0.03          # negative control: another distribution is told apart


def test_loop_stops_at_eos_and_refuses_too_long():
    vocab, eos = 8, 3

    def step(ids, mask, positions, cache):
        out = np.full((ids.shape[0], vocab), -10.0, np.float32)
        out[:, eos] = 10.0                                     # every row ends at once
        return out, cache

    got = generate(step, lambda b, c: None, np.ones((2, 4), np.int64), np.ones((2, 4), np.int64), 5, 64, [eos])
    assert got.shape == (2, 5) and (got[:, -1] == eos).all()
    with pytest.raises(LowbitError, match="exceeds the model's context of 6"):
        generate(step, lambda b, c: None, np.ones((1, 4), np.int64), np.ones((1, 4), np.int64), 5, 6, [eos])
