"""Continuous batching (runtime/batcher.py, runtime/kv_rows.py): requests that join a running batch at different
steps, with prompts of different lengths prefilled whole or in chunks, and leave it as they finish, get the tokens
each gets alone, on the torch backend, on ONNX Runtime's plain graph, and on its GroupQueryAttention graph (rows in
buffers written in place, whose keys are rotated when rows move slots)."""

import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.runtime import kv_rows, ort_session
from lowbit.runtime.batcher import Batcher
from lowbit.runtime.sampling import GenerationSettings

PROMPTS = ["the model reads every weight once per step and writes", "four bit", "a group of sixty four weights"]
SCHEDULE = [0, 2, 3]            # the step at which each prompt is submitted


@pytest.fixture(scope="module")
def arts(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("batcher")
    llama = str(model_dirs["llama"])
    return {"torch": lowbit.compile(llama, "rtn-w4g64", out=root / "t", quiet=True),
            "ort-gqa": lowbit.compile(llama, "rtn-w4g64", out=root / "g", target="onnx", quiet=True),
            "ort-plain": lowbit.compile(llama, "rtn-w4g64", out=root / "p", target="onnx", quiet=True,
                                        onnx_fusions=False)}


def load(arts, name):
    if name == "torch":
        return lowbit.load(arts[name], backend="torch", kernels="reference")
    eng = lowbit.load(arts[name.replace("-merged", "")], backend="ort")
    # As on a GPU, where the cache is not in host memory: the in-place graph's rows merged and split instead.
    if name.endswith("-merged"):
        eng.runner.host_slots = False
    return eng


def alone(eng, prompt, settings):
    ids = eng._text.encode([prompt])[0] if isinstance(prompt, str) else prompt
    out = eng.generate_ids(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                           **asdict(settings))
    return out[0, len(ids):].tolist()


def batched(eng, settings, schedule=SCHEDULE, max_batch=16, max_prefill_tokens=256, prompts=PROMPTS):
    b = Batcher(eng, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
    b.kinds = set()
    reqs, step = [], 0
    while len(reqs) < len(prompts) or b.busy:
        while len(reqs) < len(prompts) and schedule[len(reqs)] <= step:
            reqs.append(b.submit(eng._text.encode([prompts[len(reqs)]])[0], settings))
        b.step(b._admit())
        b.kinds.add(type(b.cache).__name__)
        step += 1
    return reqs, b


GREEDY = GenerationSettings(max_new_tokens=10, stop_at_eos=False)
SAMPLED = GenerationSettings(max_new_tokens=10, stop_at_eos=False, do_sample=True, top_p=0.9, seed=5)


@pytest.mark.parametrize("name", ["torch", "ort-gqa", "ort-plain", "ort-gqa-merged"])
@pytest.mark.parametrize("settings,chunk", [(GREEDY, 256), (SAMPLED, 256), (GREEDY, 3)],
                         ids=["greedy", "sampled", "greedy-chunked"])
def test_joining_and_leaving_rows_get_their_tokens_alone(arts, name, settings, chunk):
    eng = load(arts, name)
    if name.startswith("ort-gqa"):
        assert eng.runner.slot_rotary is not None and eng.manifest["onnx"]["fusions"]["GroupQueryAttention"] == 2
    reqs, b = batched(eng, settings, max_prefill_tokens=chunk)
    for prompt, req in zip(PROMPTS, reqs):
        assert req.seq.tokens == alone(eng, prompt, settings), (name, prompt)
        assert req.finish_reason == "length" and req.completion_tokens == 10
    assert b.steps < 3 * 9                           # the rows shared decode steps
    # GroupQueryAttention's graph decodes into buffers written in place; the others grow their caches.
    assert b.in_place == name.startswith("ort-gqa") and ("KVBuffers" in b.kinds) == name.startswith("ort-gqa")
    assert isinstance(b.rows, kv_rows.SlotRows) == (name == "ort-gqa")
    assert not b.busy and b.cache is None


def shifted_step_error(eng, shift):
    """Max |logits| difference of two decode steps, the first after the prompt's cache moved ``shift`` slots to
    the right, the second after it moved back, from the same steps unmoved; and the logits' scale."""
    ids = np.array([eng._text.encode([PROMPTS[0]])[0]])
    n = ids.shape[1]
    logits, cache = eng._step_np(ids, np.ones_like(ids), np.arange(n)[None], eng.runner.start(1, 0))
    tok = logits.argmax(-1)[:, None]
    want, cache2 = eng._step_np(tok, np.ones((1, n + 1), np.int64), np.array([[n]]), cache)
    padded = np.concatenate([np.zeros((1, shift), np.int64), np.ones((1, n + 1), np.int64)], axis=1)
    got, moved = eng._step_np(tok, padded, np.array([[n]]), eng.runner.cache_rows(cache, [0], shift))
    tok2 = want.argmax(-1)[:, None]
    again, _ = eng._step_np(tok2, np.ones((1, n + 2), np.int64), np.array([[n + 1]]),
                            eng.runner.cache_rows(moved, [0], -shift))
    ref, _ = eng._step_np(tok2, np.ones((1, n + 2), np.int64), np.array([[n + 1]]), cache2)
    return max(np.abs(got - want).max(), np.abs(again - ref).max()), np.abs(want).max()


@pytest.mark.parametrize("name", ["torch", "ort-gqa", "ort-plain"])
def test_moving_rows_keeps_their_logits(arts, name):
    err, scale = shifted_step_error(load(arts, name), 5)
    assert err < 1e-5 * max(scale, 1), err


def test_rows_moved_without_rotating_their_keys_go_wrong(arts, monkeypatch):
    """Negative control: GroupQueryAttention's cache moved between slots without the rotation changes the logits."""
    eng = load(arts, "ort-gqa")
    monkeypatch.setattr(ort_session, "rotate_slots", lambda keys, shift, inv: keys)
    err, scale = shifted_step_error(eng, 5)
    assert err > 1e-3 * max(scale, 1), err


def test_rotation_composes_and_inverts():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)

    def r(k, shift):                                  # rotate_slots works in place: on a copy here
        return ort_session.rotate_slots(k.copy(), shift, inv)

    np.testing.assert_allclose(r(r(keys, 7), -7), keys, atol=1e-5)
    np.testing.assert_allclose(r(r(keys, 3), 4), r(keys, 7), atol=1e-5)
    assert np.abs(r(keys, 1) - keys).max() > 0.1
    # Against the rotary's definition: x * cos + rotate_half(x) * sin at angle shift * inv_freq.
    angle = np.concatenate([5 * inv, 5 * inv])
    half = np.concatenate([-keys[..., 8:], keys[..., :8]], -1)
    np.testing.assert_allclose(r(keys, 5), keys * np.cos(angle) + half * np.sin(angle), atol=1e-5)


def test_a_full_batch_makes_requests_wait_and_the_thread_serves_them(arts):
    eng = load(arts, "ort-gqa")
    settings = GenerationSettings(max_new_tokens=6, stop_at_eos=False)
    b = Batcher(eng, max_batch=2).start()
    try:
        reqs = [b.submit(eng._text.encode([p])[0], settings) for p in PROMPTS]
        texts = [r.result() for r in reqs]
    finally:
        b.close()
    assert texts == [eng.generate(p, max_new_tokens=6, stop_at_eos=False) for p in PROMPTS]
    assert not b.thread.is_alive()


def test_cancelled_requests_leave_and_others_finish(arts):
    eng = load(arts, "torch")
    b = Batcher(eng).start()
    try:
        settings = GenerationSettings(max_new_tokens=40, stop_at_eos=False)
        keep, drop = (b.submit(eng._text.encode([p])[0], settings) for p in PROMPTS[:2])
        first = next(iter(drop))
        drop.cancel()
        assert keep.result() and len(keep.seq.tokens) == 40
        assert len(drop.seq.tokens) < 40 and first is not None
    finally:
        b.close()


def test_bad_requests_are_refused_before_they_queue(arts):
    eng = load(arts, "torch")
    b = Batcher(eng)
    with pytest.raises(LowbitError, match="empty prompt"):
        b.submit([], GenerationSettings())
    with pytest.raises(LowbitError, match="exceeds the model's context"):
        b.submit([1] * eng.max_positions, GenerationSettings())
    with pytest.raises(LowbitError, match="max_batch"):
        Batcher(eng, max_batch=0)
    b.close()
    with pytest.raises(LowbitError, match="shut down"):
        b.submit([1, 2], GenerationSettings())
    assert threading.active_count() >= 1


def test_the_torch_free_engine_batches_too(arts):
    from lowbit.runtime.lite import LiteEngine

    eng, ref = LiteEngine.load(arts["ort-gqa"]), load(arts, "ort-gqa")
    settings = GenerationSettings(max_new_tokens=8, stop_at_eos=False)
    reqs, b = batched(eng, settings)
    assert b.in_place and [r.seq.tokens for r in reqs] == [alone(ref, p, settings) for p in PROMPTS]


def test_a_prompt_that_would_push_the_batch_past_the_context_waits(arts):
    eng = load(arts, "ort-gqa")
    short = eng._text.encode([PROMPTS[1]])[0]
    long = (eng._text.encode([" ".join(PROMPTS)])[0] * 20)[:eng.max_positions - 40]
    b = Batcher(eng)
    first = b.submit(short, GenerationSettings(max_new_tokens=60, stop_at_eos=False))
    b.step(b._admit())
    second = b.submit(long, GenerationSettings(max_new_tokens=30, stop_at_eos=False))
    joined_at, widths = None, []
    while b.running or b.waiting:
        b.step(b._admit())
        widths.append(b.mask.shape[1])
        if joined_at is None and second in b.running:
            joined_at = len(first.seq.tokens)
    # It waited until the merged batch's slots fit the context: 216 + what the first still makes <= 256.
    assert joined_at >= 60 - (eng.max_positions - len(long)) and max(widths) <= eng.max_positions
    assert len(first.seq.tokens) == 60 and len(second.seq.tokens) == 30
    assert second.seq.tokens == alone(eng, long, second.seq.settings)


def test_prompts_prefill_in_chunks_while_the_running_rows_decode(arts):
    eng = load(arts, "ort-gqa")
    settings = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    rows = [eng._text.encode([p])[0] for p in PROMPTS]
    b = Batcher(eng, max_prefill_tokens=3)
    reqs = [b.submit(r, settings) for r in rows]
    b.step(b._admit())
    assert b.running[0] is reqs[0] and reqs[0].completion_tokens == 2    # nothing was decoding: whole prompt
    assert sum(r.prefilled for r in reqs[1:]) <= 3 and len(rows[2]) > 3        # then the budget
    while b.busy:
        before = [r.prefilled for r in reqs] + [len(reqs[0].seq.tokens)]
        b.step(b._admit())
        after = [r.prefilled for r in reqs] + [len(reqs[0].seq.tokens)]
        assert sum(after[:3]) - sum(before[:3]) <= 3                       # the budget per turn
        assert after[3] == min(before[3] + 1, 12)                          # and the first row made its token
    assert [r.seq.tokens for r in reqs] == [alone(eng, r, settings) for r in rows]
    with pytest.raises(LowbitError, match="max_prefill_tokens"):
        Batcher(eng, max_prefill_tokens=0)


def slot_join_error(eng):
    """Max |logits| difference between a short prompt's next step decoded in a row beside a longer prompt (its cache
    moved right, into in-place rows) and the same step alone; and the logits' scale."""
    long, short = (np.array([eng._text.encode([p])[0]]) for p in PROMPTS[:2])
    rows = kv_rows.SlotRows(eng.runner, 4)
    last = []
    for ids in (long, short):
        n = ids.shape[1]
        logits, cache = eng._step_np(ids, np.ones_like(ids), np.arange(n)[None], rows.prefill_cache(n, 4))
        rows.join(cache, n, 4)
        last.append(logits.argmax(-1))
    assert rows.mask[1].sum() == short.shape[1] < rows.width           # the short row was moved right
    mask = np.pad(rows.mask, ((0, 0), (0, 1)), constant_values=1)
    got, _ = eng._step_np(np.array(last), mask, mask.sum(1, keepdims=True) - 1, rows.step_cache())
    n = short.shape[1]
    _, cache = eng._step_np(short, np.ones_like(short), np.arange(n)[None], eng.runner.start(1, n + 1))
    want, _ = eng._step_np(last[1][None], np.ones((1, n + 1), np.int64), np.array([[n]]), cache)
    return np.abs(got[1] - want[0]).max(), np.abs(want).max()


def test_a_row_joins_in_place_with_its_keys_rotated(arts, monkeypatch):
    eng = load(arts, "ort-gqa")
    err, scale = slot_join_error(eng)
    assert err < 1e-5 * max(scale, 1), err
    monkeypatch.setattr(ort_session, "rotate_slots", lambda keys, shift, inv: keys)         # negative control
    err, scale = slot_join_error(eng)
    assert err > 1e-3 * max(scale, 1), err


def test_in_place_rows_copy_only_the_rows_that_join_or_move(arts, monkeypatch):
    eng = load(arts, "ort-gqa")
    copies = []
    real = eng.runner.slot_copy
    monkeypatch.setattr(eng.runner, "slot_copy", lambda dst, rows, *a: (copies.append(len(rows)), real(dst, rows, *a)))
    settings = [GenerationSettings(max_new_tokens=n, stop_at_eos=False) for n in (9, 3, 6, 6)]
    b = Batcher(eng, max_prefill_tokens=3)
    prompts = [eng._text.encode([p])[0] for p in PROMPTS] + [eng._text.encode(["one more"])[0]]
    reqs = [b.submit(p, s) for p, s in zip(prompts, settings)]
    orders = []
    while b.busy:
        b.step(b._admit())
        orders.append([reqs.index(r) for r in b.running])
    assert [r.seq.tokens for r in reqs] == [alone(eng, p, s) for p, s in zip(prompts, settings)]
    assert [0, 2] in orders and [3, 2] in orders          # the last row filled the hole the first left
    assert copies and max(copies) == 1 and b.rows.capacity > 0         # never the whole batch


def test_in_place_rows_that_run_out_of_slots_drop_leading_ones_or_grow(arts, monkeypatch):
    eng = load(arts, "ort-gqa")
    monkeypatch.setattr(kv_rows, "slack", lambda slots: 1)             # buffers full at every turn
    events = []
    for name in ("_shift", "_reserve"):
        real = getattr(kv_rows.SlotRows, name)
        monkeypatch.setattr(kv_rows.SlotRows, name, lambda self, n, _real=real, _name=name:
                            events.append((_name, n, self.capacity, _real(self, n) or self.capacity)))
    for prompts, schedule, chunk in ((PROMPTS, [0, 1, 6], 4), (PROMPTS[::-1], [0, 1, 2], 256)):
        reqs, b = batched(eng, GREEDY, schedule=schedule, max_prefill_tokens=chunk, prompts=prompts)
        assert [r.seq.tokens for r in reqs] == [alone(eng, p, GREEDY) for p in prompts]
    assert any(e[0] == "_shift" and e[1] < 0 for e in events)            # leading slots dropped in place
    assert any(e[0] == "_shift" and e[1] > 0 for e in events)            # rows moved right for a wider joiner
    assert any(e[0] == "_reserve" and 0 < e[2] < e[3] for e in events)     # and the buffers grew, rows copied
