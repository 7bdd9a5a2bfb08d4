"""Continuous batching: requests join and leave one running batch between decode steps, each with its own
settings, random stream, text and KV cache rows (``runtime.generation.Sequence``), on any engine.

One thread (``Batcher.start``) owns the engine and runs the loop, each turn:

1. waiting requests are admitted while fewer than ``max_batch`` are running or prefilling, and one more, which
   prefills ahead of a free row (all but its last token);
2. prefill: the admitted prompts, in order, each in its own cache, in chunks of at most ``max_prefill_tokens``
   prompt tokens per turn in all while rows are decoding (the running streams wait for them, so a chunk bounds
   that wait); a prompt prefilled whole picks its first token and its row joins the running batch;
3. one decode step for every running row, each row picking its next token from its own logits;
4. finished and cancelled rows leave.

The running batch's cache is ``runtime.kv_rows``'s: rows in buffers the graph writes in place, where a join or
leave copies one row (ONNX Runtime's GroupQueryAttention on the CPU), or the cache each step returns, merged and
split. Requests see their text through a queue; the caller's thread never touches the engine.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable, Optional

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import kv_rows
from lowbit.runtime.generation import Sequence, check_context
from lowbit.runtime.sampling import GenerationSettings, token_logprobs

DONE = object()
MAX_LOGPROBS = 20        # alternatives per token (OpenAI's top_logprobs limit)


class Request:
    """One prompt's place in the batcher: iterate it for ``(text, finish reason or None, logprobs or None)``
    events, one per token, as they come, or ``result()`` for the whole text; ``cancel()`` frees its row at the
    next step. With a ``sink``, the events go to ``sink(event)`` instead (called on the batcher's thread; an
    asyncio server forwards them to its loop): those tuples, a LowbitError if generation failed, then ``DONE``.
    ``logprobs`` (top alternatives, 0 or more): each event carries ``(token id, its log-probability, [(id,
    log-probability)] of the likeliest)`` (``sampling.token_logprobs``)."""

    def __init__(self, seq: Sequence, sink: Optional[Callable] = None, logprobs: Optional[int] = None):
        self.seq, self.logprobs = seq, logprobs
        self.events: "queue.Queue" = queue.Queue()
        self.put = sink or self.events.put
        self.cancelled = threading.Event()
        self.prefilled, self.cache = 0, None          # prompt tokens in its own cache, before it joins

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
        return "".join(event[0] for event in self)


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
        # Running rows wait while prompts prefill: at most this many prompt tokens per turn, so an arrival costs
        # every stream a bounded gap, spread over turns, instead of one long stall.
        self.max_prefill_tokens = max_prefill_tokens
        self.rows = kv_rows.for_runner(engine.runner, max_batch)
        self.in_place = isinstance(self.rows, kv_rows.SlotRows) or self.rows.in_place
        self.decode = engine._text.decode if engine._text is not None else None
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread: Optional[threading.Thread] = None
        self.steps = 0                              # decode steps run, for tests and statistics

    @property
    def cache(self):
        return self.rows.cache

    @property
    def mask(self) -> np.ndarray:
        return self.rows.mask

    # ---- the caller's side -------------------------------------------------------------------
    def submit(self, prompt: list[int], settings: GenerationSettings, index: int = 0,
               sink: Optional[Callable] = None, logprobs: Optional[int] = None) -> Request:
        """Queue one prompt (token ids), sequence ``index`` of its call (its random stream); refused at once when
        it cannot run (empty, longer than the context). ``logprobs``: see ``Request``."""
        if not prompt:
            raise LowbitError("empty prompt; give some text to continue")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_LOGPROBS):
            raise LowbitError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {logprobs!r}")
        check_context(len(prompt), settings.max_new_tokens, self.engine.max_positions)
        req = Request(Sequence(prompt, settings, self.engine._eos, index, self.decode), sink, logprobs)
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

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.busy and not self.closed:
                    self.cond.wait()
                if self.closed and not self.busy:
                    return
                admitted = self._admit()
            try:
                self.step(admitted)
            except Exception as e:  # noqa: BLE001  (every request hears of it; the loop carries on)
                self._fail(list(dict.fromkeys(admitted + self.prefilling + self.running)), e)

    def _admit(self) -> list[Request]:
        """The waiting requests that start prefilling now, first come first served, while rows are free, and one
        more: it prefills ahead, all but its last token, so it joins as soon as a row frees."""
        admitted = []
        while self.waiting and len(self.running) + len(self.prefilling) + len(admitted) <= self.max_batch:
            admitted.append(self.waiting.popleft())
        return admitted

    @staticmethod
    def _remaining(reqs: list[Request]) -> int:
        return max((r.seq.settings.max_new_tokens - len(r.seq.tokens) for r in reqs), default=0)

    def step(self, admitted: list[Request]) -> None:
        """Prefill (``admitted`` join the prefilling), run one decode step, let finished rows go (the loop's body;
        tests call it)."""
        self.prefilling += admitted
        self._prefill()
        if self.running:
            self._decode()
            self._leave()

    def _prefill(self) -> None:
        # With no row decoding, nobody waits on a prompt: the first prefills whole.
        budget = self.max_prefill_tokens if self.running else None
        for r in list(self.prefilling):
            if self._gone(r):
                self._drop(r)
                continue
            prompt = r.seq.prompt
            # Without a free row the last token waits: its logits pick the first token, and the next would only
            # come once the request has a row.
            upto = len(prompt) - (len(self.running) >= self.max_batch)
            if r.prefilled < upto:
                take = upto - r.prefilled if budget is None else min(budget, upto - r.prefilled)
                if take == 0:
                    return
                if r.cache is None:
                    r.cache = self.rows.prefill_cache(len(prompt), r.seq.settings.max_new_tokens)
                end = r.prefilled + take
                logits, r.cache = self.engine._step_np(prompt[None, r.prefilled:end], np.ones((1, end), np.int64),
                                                       np.arange(r.prefilled, end)[None], r.cache)
                r.prefilled, budget = end, None if budget is None else budget - take
                if end < len(prompt):
                    return
                self._pick([r], logits)
            elif r.prefilled < len(prompt):                 # prefilled ahead, still no free row
                return
            if not self._fits(r):           # waits for rows to leave, and the ones behind it wait too
                return
            if self._gone(r):
                self._drop(r)
                continue
            self.prefilling.remove(r)
            self.rows.join(r.cache, len(prompt), self._remaining(self.running + [r]))
            r.cache = None
            self.running.append(r)
            budget = self.max_prefill_tokens if budget is None else budget

    def _fits(self, r: Request) -> bool:
        """Whether the batch with ``r`` stays within the model's context until its next change (a slot past it has
        no position in a graph that rotates by slot)."""
        if not self.running:
            return True
        width = max(self.rows.width, len(r.seq.prompt))
        return len(self.running) < self.max_batch and \
            width + self._remaining(self.running + [r]) <= self.engine.max_positions

    def _drop(self, r: Request) -> None:
        self.prefilling.remove(r)
        r.cache = None
        r.put(DONE)

    def _decode(self) -> None:
        cache = self.rows.step_cache()
        nxt = np.array([r.seq.tokens[-1] for r in self.running], np.int64)
        mask = np.concatenate([self.rows.mask, np.ones((len(self.running), 1), np.int64)], axis=1)
        positions = mask.sum(1, keepdims=True) - 1
        logits, cache = self.engine._step_np(nxt[:, None], mask, positions, cache)
        self.rows.stepped(cache)
        self.steps += 1
        self._pick(self.running, logits)

    def _pick(self, reqs: list[Request], logits: np.ndarray) -> None:
        for row, r in enumerate(reqs):
            if r.seq.finish_reason is None and not r.cancelled.is_set():
                token = r.seq.next_token(logits[row])
                lp = None if r.logprobs is None else (token, *token_logprobs(logits[row], token, r.logprobs))
                r.put((r.seq.push(token), r.seq.finish_reason, lp))

    def _leave(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not self._gone(r)]
        if len(keep) == len(self.running):
            return
        for r in self.running:
            if self._gone(r):
                r.put(DONE)
        order = self.rows.leave(keep, self._remaining([self.running[i] for i in keep]))
        self.running = [self.running[i] for i in order]

    @staticmethod
    def _gone(r: Request) -> bool:
        return r.seq.finish_reason is not None or r.cancelled.is_set()

    def _fail(self, reqs: list[Request], error: BaseException) -> None:
        error = error if isinstance(error, LowbitError) else LowbitError(f"generation failed: {error}")
        for r in reqs:
            r.cache = None
            r.put(error)
            r.put(DONE)
        self.prefilling, self.running = [], []
        self.rows = kv_rows.for_runner(self.runner, self.max_batch)
