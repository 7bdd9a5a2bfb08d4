"""The shared sampler and loop (runtime/sampling.py, runtime/generation.py): greedy is the argmax, the cuts and
penalties equal plain references, a seed reproduces, samples follow the softmax, and the loop stops where told."""

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.runtime.generation import Sequence, generate
from lowbit.runtime.sampling import GenerationSettings, Sampler, nucleus


def logits(seed=0, vocab=50):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def sampler(**kw):
    return Sampler(GenerationSettings(**kw))


NONE = np.zeros(0, np.int64)


def test_greedy_and_degenerate_cuts_are_the_argmax():
    for seed in range(5):
        x = logits(seed)
        assert sampler().pick(x, NONE, NONE) == x.argmax()
        assert sampler(do_sample=True, top_k=1, seed=seed).pick(x, NONE, NONE) == x.argmax()
        assert sampler(do_sample=True, top_p=1e-9, seed=seed).pick(x, NONE, NONE) == x.argmax()
        assert sampler(do_sample=True, min_p=1.0, seed=seed).pick(x, NONE, NONE) == x.argmax()


def reference_probabilities(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The cuts by full sorts, one after another."""
    x = x.astype(np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = np.zeros(p.size, bool)
    keep[order[:int(np.searchsorted(cum, top_p)) + 1]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    p = np.where(p < min_p * p.max(), 0.0, p)
    return p / p.sum()


@pytest.mark.parametrize("vocab", [50, 5000])
def test_cuts_equal_full_sort_references(vocab):
    rng = np.random.default_rng(1)
    for trial in range(20):
        # Flat logits (scale 0.1) put the nucleus beyond the first 256 candidates: the doubling path.
        x = rng.normal(size=vocab) * (0.1 if trial % 2 else 3.0)
        kw = dict(temperature=float(rng.uniform(0.5, 2)), top_k=int(rng.integers(0, vocab)),
                  top_p=float(rng.uniform(0.3, 1.0)), min_p=float(rng.uniform(0, 0.2)))
        got = Sampler(GenerationSettings(do_sample=True, **kw)).probabilities(x)
        np.testing.assert_allclose(got, reference_probabilities(x, **kw), rtol=1e-9, atol=1e-15)
    # Negative control: the reference tells a different nucleus apart.
    x = rng.normal(size=vocab)
    assert not np.allclose(nucleus(reference_probabilities(x), 0.5), nucleus(reference_probabilities(x), 0.9))


def test_penalties_equal_their_definitions():
    x = logits(3, vocab=20).astype(np.float64)
    prompt, generated = np.array([1, 2, 2]), np.array([2, 5, 5, 7])
    got = sampler(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25).penalize(x, prompt, generated)
    want = x.copy()
    for t in (1, 2, 5, 7):                                          # prompt and output: each seen token once
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t, n in ((2, 1), (5, 2), (7, 1)):                           # output only: presence once, frequency per use
        want[t] -= 0.5 + 0.25 * n
    np.testing.assert_allclose(got, want)
    assert not np.allclose(sampler(repetition_penalty=1.3).penalize(x, prompt, generated), want)   # control
    assert sampler().penalize(x, prompt, generated) is x                                         # all off: as is
    # A penalty changes the greedy pick away from a repeated token.
    top = int(x.argmax())
    assert sampler(frequency_penalty=2.0).pick(x, NONE, np.array([top] * 10)) != top


def test_seed_reproduces_per_sequence():
    x = logits(4, vocab=1000)
    s = GenerationSettings(do_sample=True, seed=3)

    def draws(index):
        smp = Sampler(s, index)
        return [smp.pick(x, NONE, NONE) for _ in range(30)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)                        # another sequence of the call: another stream
    assert draws(0) != [Sampler(GenerationSettings(do_sample=True, seed=4)).pick(x, NONE, NONE) for _ in range(30)]


def test_samples_follow_the_softmax():
    x = logits(2, vocab=6)
    smp = sampler(do_sample=True, seed=5)
    counts = np.bincount([smp.pick(x, NONE, NONE) for _ in range(4000)], minlength=6) / 4000
    p = np.exp(x - x.max())
    p /= p.sum()
    assert np.abs(counts - p).max() < 0.03
    assert np.abs(counts - np.roll(p, 1)).max() > 0.03          # negative control: another distribution is told apart


def fixed_step(vocab, script):
    """A backend whose step t puts every row's logits on ``script[t]``."""
    calls = []

    def step(ids, mask, positions, cache):
        out = np.full((ids.shape[0], vocab), -10.0, np.float32)
        out[:, script[min(len(calls), len(script) - 1)]] = 10.0
        calls.append(ids.shape)
        return out, cache

    return step, calls


def test_loop_stops_at_eos_and_refuses_too_long():
    eos = 3
    step, calls = fixed_step(8, [5, 6, eos, 1])
    got = generate(step, lambda b, c: None, np.ones((2, 4), np.int64), np.ones((2, 4), np.int64),
                   GenerationSettings(max_new_tokens=6), 64, [eos])
    assert got[:, 4:].tolist() == [[5, 6, eos]] * 2 and len(calls) == 3
    step, _ = fixed_step(8, [5, 6, eos, 1])
    got = generate(step, lambda b, c: None, np.ones((1, 4), np.int64), np.ones((1, 4), np.int64),
                   GenerationSettings(max_new_tokens=5, stop_at_eos=False), 64, [eos])
    assert got[0, 4:].tolist() == [5, 6, eos, 1, 1]
    with pytest.raises(LowbitError, match="exceeds the model's context of 6"):
        generate(step, lambda b, c: None, np.ones((1, 4), np.int64), np.ones((1, 4), np.int64),
                 GenerationSettings(max_new_tokens=5), 6, [eos])


TOKENS = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\n", 9: ""}


def text_decode(ids):
    return "".join(TOKENS.get(i, "?") for i in ids)


def run_text(tokens, **kw):
    seq = Sequence([7], GenerationSettings(max_new_tokens=len(tokens), **kw), eos=[9], decode=text_decode)
    pieces = []
    for t in tokens:
        pieces.append(seq.push(t))
        if seq.finish_reason:
            break
    return pieces, seq.finish_reason


def test_stop_strings_cut_across_tokens_and_hold_back_only_what_may_stop():
    pieces, why = run_text([1, 2, 3, 4, 5], stop=["o wo"])
    assert "".join(pieces) == "Hell" and why == "stop"
    pieces, why = run_text([1, 2, 3, 4, 5], stop=["rx"])
    assert "".join(pieces) == "Hello world!" and why == "length"
    assert pieces[2] == " wo" and pieces[3] == "rld"               # "r" might have begun "rx": held one token
    pieces, why = run_text([1, 2, 9, 4], stop=["lo!"])
    assert "".join(pieces) == "Hello" and why == "stop"             # end of sequence: the held text is shown
    pieces, why = run_text([1, 2, 6, 3], stop=["\n"])
    assert "".join(pieces) == "Hello" and why == "stop"


def test_text_never_splits_a_character():
    data = "héllo wörld ✓ 🙂 end".encode()
    pieces = [bytes([b]) for b in data]                            # one token per byte: characters span tokens

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    seq = Sequence([0], GenerationSettings(max_new_tokens=len(data)), eos=[], decode=decode)
    out = [seq.push(i) for i in range(1, len(data))]
    assert all("\ufffd" not in p for p in out)
    assert "h" + "".join(out) == data.decode()
    # Control: decoding each token alone breaks characters.
    assert "\ufffd" in "".join(decode([i]) for i in range(len(data)))


@pytest.mark.parametrize("kw, needle", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(top_p=2.0), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"), (dict(stop=["x"] * 17), "stop"),
    (dict(do_sample="yes"), "do_sample"), (dict(top_k=True), "top_k"),
])
def test_settings_out_of_range_are_refused_in_one_line(kw, needle):
    with pytest.raises(LowbitError, match=needle) as e:
        GenerationSettings(**kw)
    assert "\n" not in str(e.value)


def test_unknown_settings_are_refused():
    with pytest.raises(LowbitError, match="unknown generation setting.*top_q"):
        GenerationSettings.of(top_q=0.5)
    assert GenerationSettings.of(GenerationSettings(top_k=3), seed=1) == GenerationSettings(top_k=3, seed=1)
    assert GenerationSettings(stop="x").stop == ("x",)
