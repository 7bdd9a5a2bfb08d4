"""Continuous batching: requests join and leave one running batch between decode steps, each with its own
settings, random stream, text and KV cache rows (``runtime.generation.Sequence``), on any engine.

One thread (``Batcher.start``) owns the engine and runs the loop:

1. waiting requests (up to ``max_batch`` running in all, about ``max_prefill_tokens`` prompt tokens per step) are
   prefilled together, left-padded among themselves, and pick their first token;
2. their cache joins the running batch's: the narrower of the two is padded on the left (mask 0) to the wider;
3. one decode step for every running row, each row picking its next token from its own logits;
4. finished and cancelled rows leave: their cache rows are dropped, then the leading columns no row needs.

The runner gives ``start``/``step`` (as for ``runtime.generation``) and two cache operations:
``cache_rows(cache, rows, left, width, capacity)`` (keep ``rows``' first ``width`` slots, then pad ``left`` > 0
empty slots at the front or drop -``left``; in buffers of ``capacity`` slots where the graph writes its cache in
place) and ``cache_concat(caches)`` (along the batch). Rows keep their positions through both: positions come
from the mask, and a graph that rotates by cache slot instead (ONNX Runtime's GroupQueryAttention) has its keys
rotated by the shift (``ort_session``). Requests see their text through a queue; the caller's thread never
touches the engine.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable, Optional

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.generation import Sequence, check_context, mask_positions, pad_rows
from lowbit.runtime.sampling import GenerationSettings

DONE = object()
TRIM_SLOTS = 64         # leading cache slots no row reads are dropped once there are this many (or a quarter)


class Request:
    """One prompt's place in the batcher: iterate it for ``(text, finish reason or None)`` events as they come,
    or ``result()`` for the whole text; ``cancel()`` frees its row at the next step. With a ``sink``, the events
    go to ``sink(event)`` instead (called on the batcher's thread; an asyncio server forwards them to its loop):
    ``(text, finish reason)`` tuples, a LowbitError if generation failed, then ``DONE``."""

    def __init__(self, seq: Sequence, sink: Optional[Callable] = None):
        self.seq = seq
        self.events: "queue.Queue" = queue.Queue()
        self.put = sink or self.events.put
        self.cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.tokens)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.seq.finish_reason

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        while True:
            item = self.events.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> str:
        return "".join(text for text, _ in self)


class Batcher:
    """``Batcher(engine, max_batch, max_prefill_tokens)``; ``start()``; ``submit(prompt ids, settings)`` from any
    thread; ``close()``."""

    def __init__(self, engine, max_batch: int = 16, max_prefill_tokens: int = 256):
        if engine.task != "causal-lm":
            raise LowbitError("serving needs a causal LM artifact; this one is an encoder")
        for name, value in (("max_batch", max_batch), ("max_prefill_tokens", max_prefill_tokens)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise LowbitError(f"{name} must be an integer at least 1, got {value!r}")
        for op in ("cache_rows", "cache_concat"):
            if not hasattr(engine.runner, op):
                raise LowbitError(f"the {engine.backend} backend cannot batch requests continuously (no {op}); "
                                  "use --backend torch or ort")
        self.engine, self.runner, self.max_batch = engine, engine.runner, max_batch
        # Running rows wait while joiners prefill: at most this many (padded) prompt tokens join per step, so a
        # wave of arrivals spreads over steps instead of stalling every stream at once.
        self.max_prefill_tokens = max_prefill_tokens
        # A graph that writes its cache in place (ONNX Runtime's GroupQueryAttention) decodes into buffers sized
        # at each join and leave, so a step copies nothing.
        self.in_place = bool(getattr(engine.runner, "in_place_cache", False))
        self.pad = int(engine._eos[0]) if engine._eos else 0
        self.decode = engine._text.decode if engine._text is not None else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cache, self.mask = None, np.zeros((0, 0), np.int64)
        self.cond = threading.Condition()
        self.closed = False
        self.thread: Optional[threading.Thread] = None
        self.steps = 0                              # decode steps run, for tests and statistics

    # ---- the caller's side -------------------------------------------------------------------
    def submit(self, prompt: list[int], settings: GenerationSettings, index: int = 0,
               sink: Optional[Callable] = None) -> Request:
        """Queue one prompt (token ids), sequence ``index`` of its call (its random stream); refused at once when
        it cannot run (empty, longer than the context)."""
        if not prompt:
            raise LowbitError("empty prompt; give some text to continue")
        check_context(len(prompt), settings.max_new_tokens, self.engine.max_positions)
        req = Request(Sequence(prompt, settings, self.engine._eos, index, self.decode), sink)
        with self.cond:
            if self.closed:
                raise LowbitError("the batcher is shut down")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def start(self) -> "Batcher":
        self.thread = threading.Thread(target=self._loop, name="lowbit-batcher", daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish the running ones, then stop the loop."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running and not self.closed:
                    self.cond.wait()
                if self.closed and not self.running and not self.waiting:
                    return
                joining = self._admit()
            try:
                self.step(joining)
            except Exception as e:  # noqa: BLE001  (every request hears of it; the loop carries on)
                self._fail(list(dict.fromkeys(joining + self.running)), e)

    def _admit(self) -> list[Request]:
        """The waiting requests that join now, first come first served: while the batch has rows free and the
        merged batch stays within the model's context until its next change (a slot past it has no position in
        a graph that rotates by slot), so a long prompt waits for rows to leave rather than be passed by others."""
        joining, width, longest = [], self.mask.shape[1], 0
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            r = self.waiting[0]
            w = max(width, len(r.seq.prompt))
            rows = self.running + joining
            if rows and w + self._remaining(rows + [r]) > self.engine.max_positions:
                break
            if joining and (len(joining) + 1) * max(longest, len(r.seq.prompt)) > self.max_prefill_tokens:
                break
            joining.append(self.waiting.popleft())
            width, longest = w, max(longest, len(r.seq.prompt))
        return joining

    @staticmethod
    def _remaining(reqs: list[Request]) -> int:
        return max(r.seq.settings.max_new_tokens - len(r.seq.tokens) for r in reqs)

    def step(self, joining: list[Request]) -> None:
        """Admit ``joining``, run one decode step, let finished rows go (the loop's body; tests call it)."""
        for r in joining:
            if self._gone(r):
                r.put(DONE)
        joining = [r for r in joining if not self._gone(r)]
        if joining:
            self._join(joining)
            self._leave()
        if self.running:
            self._decode()
            self._leave()

    def _capacity(self, width: int, reqs: list[Request]) -> int:
        """Cache slots the rows need until the next join or leave (each of which reallocates): the width plus the
        most tokens any of them may still make. 0 for runners whose cache grows by itself."""
        return width + self._remaining(reqs) if self.in_place else 0

    def _join(self, joining: list[Request]) -> None:
        ids, mask = pad_rows([r.seq.prompt.tolist() for r in joining], self.pad)
        cache = self.runner.start(len(joining), self._capacity(mask.shape[1], joining))
        logits, cache = self.engine._step_np(ids, mask, mask_positions(mask), cache)
        self._pick(joining, logits)
        if self.running:
            width = max(mask.shape[1], self.mask.shape[1])
            everyone = self.running + joining
            capacity = self._capacity(width, everyone)
            grow_old, grow_new = width - self.mask.shape[1], width - mask.shape[1]
            cache = self.runner.cache_concat([
                self.runner.cache_rows(self.cache, list(range(len(self.running))), grow_old, self.mask.shape[1],
                                       capacity),
                self.runner.cache_rows(cache, list(range(len(joining))), grow_new, mask.shape[1], capacity)])
            mask = np.concatenate([np.pad(self.mask, ((0, 0), (grow_old, 0))), np.pad(mask, ((0, 0), (grow_new, 0)))])
        self.cache, self.mask = cache, mask
        self.running += joining

    def _decode(self) -> None:
        nxt = np.array([r.seq.tokens[-1] for r in self.running], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.running), 1), np.int64)], axis=1)
        positions = mask.sum(1, keepdims=True) - 1
        logits, self.cache = self.engine._step_np(nxt[:, None], mask, positions, self.cache)
        self.mask = mask
        self.steps += 1
        self._pick(self.running, logits)

    def _pick(self, reqs: list[Request], logits: np.ndarray) -> None:
        for row, r in enumerate(reqs):
            if r.seq.finish_reason is None and not r.cancelled.is_set():
                piece = r.seq.push(r.seq.next_token(logits[row]))
                r.put((piece, r.seq.finish_reason))

    def _leave(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not self._gone(r)]
        if len(keep) == len(self.running):
            return
        for r in self.running:
            if self._gone(r):
                r.put(DONE)
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, np.zeros((0, 0), np.int64)
            return
        mask = self.mask[keep]
        first = int(np.argmax(mask.any(0)))          # leading columns no remaining row reads
        # Dropped only when they are many: dropping moves every row (a copy, and a rotation by slot).
        first = first if first >= max(TRIM_SLOTS, mask.shape[1] // 4) else 0
        self.cache = self.runner.cache_rows(self.cache, keep, -first, mask.shape[1],
                                            self._capacity(mask.shape[1] - first, self.running))
        self.mask = mask[:, first:]

    @staticmethod
    def _gone(r: Request) -> bool:
        return r.seq.finish_reason is not None or r.cancelled.is_set()

    def _fail(self, reqs: list[Request], error: BaseException) -> None:
        error = error if isinstance(error, LowbitError) else LowbitError(f"generation failed: {error}")
        for r in reqs:
            r.put(error)
            r.put(DONE)
        self.running, self.cache, self.mask = [], None, np.zeros((0, 0), np.int64)
