"""The running batch's KV cache for continuous batching (``runtime.batcher``): one row per running request,
slots aligned on the right (the newest token of every row in the last slot), a row's earlier slots empty (mask 0)
when it has fewer tokens than the widest.

- ``SlotRows``: buffers of ``max_batch`` rows, preallocated, that the graph writes in place (ONNX Runtime's
  GroupQueryAttention on the CPU). A decode step runs the first ``n`` rows as they lie; a request that joins is
  copied into row ``n``, and one that leaves is replaced by the last row: each copies one row, never the batch.
- ``MergedRows``: the cache the runner returns each step (the torch program, ONNX graphs that concatenate their
  cache): a join pads the narrower of the two caches on the left and concatenates them, a leave selects rows.

Both drop the leading slots no row reads (every row moves then): ``MergedRows`` once there are many,
``SlotRows`` when its buffers run out of slots. Positions come from the mask, except in a graph that rotates by
slot: there the runner rotates moved keys by the move.
"""

from __future__ import annotations

import numpy as np

TRIM_SLOTS = 64         # leading cache slots no row reads are dropped once there are this many (or a quarter)
SLACK_SLOTS = 64        # SlotRows' buffers grow by at least this many slots (or half), so they rarely reallocate


def for_runner(runner, max_batch: int):
    """The rows a runner batches in: ``SlotRows`` where its cache lives in host buffers the graph writes in place."""
    return SlotRows(runner, max_batch) if getattr(runner, "host_slots", False) else MergedRows(runner)


def slack(slots: int) -> int:
    """Slots ``SlotRows`` buffers get beyond the ``slots`` they need: at least SLACK_SLOTS, or half."""
    return max(SLACK_SLOTS, slots // 2)


def _unread(mask: np.ndarray) -> int:
    """The leading slots no row reads (all of them when there are no rows)."""
    return int(np.argmax(mask.any(0))) if len(mask) else mask.shape[1]


def _leading(mask: np.ndarray) -> int:
    """The leading slots no row reads, when there are enough to be worth moving every row."""
    first = _unread(mask)
    return first if first >= max(TRIM_SLOTS, mask.shape[1] // 4) else 0


class MergedRows:
    """The cache the runner returns each step. ``mask`` [n, width]; ``step_cache()`` for the next decode step and
    ``stepped(cache)`` after it; ``prefill_cache(length, remaining)`` for a request's own prompt; ``join(cache,
    length, remaining)``; ``leave(keep, remaining) -> order``. ``remaining``: the most tokens any row may still
    make, which sizes the buffers of a graph that writes its cache in place."""

    def __init__(self, runner):
        self.runner = runner
        self.in_place = bool(getattr(runner, "in_place_cache", False))
        self.cache, self.mask = None, np.zeros((0, 0), np.int64)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def _capacity(self, width: int, remaining: int) -> int:
        return width + remaining if self.in_place else 0

    def prefill_cache(self, length: int, remaining: int):
        """An empty cache for one request's prompt of ``length`` tokens (then ``remaining`` more)."""
        return self.runner.start(1, self._capacity(length, remaining))

    def step_cache(self):
        return self.cache

    def stepped(self, cache) -> None:
        self.cache = cache
        self.mask = np.pad(self.mask, ((0, 0), (0, 1)), constant_values=1)

    def join(self, cache, length: int, remaining: int) -> None:
        """Add one row: ``cache`` (from ``prefill_cache``) holds its ``length`` tokens in slots [0, length)."""
        mask = np.ones((1, length), np.int64)
        if self.cache is not None:
            width = max(length, self.width)
            capacity = self._capacity(width, remaining)
            grow_old, grow_new = width - self.width, width - length
            cache = self.runner.cache_concat([
                self.runner.cache_rows(self.cache, list(range(len(self.mask))), grow_old, self.width, capacity),
                self.runner.cache_rows(cache, [0], grow_new, length, capacity)])
            mask = np.concatenate([np.pad(self.mask, ((0, 0), (grow_old, 0))), np.pad(mask, ((0, 0), (grow_new, 0)))])
        self.cache, self.mask = cache, mask

    def leave(self, keep: list[int], remaining: int) -> list[int]:
        """Keep rows ``keep``; returns which old row each new row is (``keep`` itself)."""
        if not keep:
            self.cache, self.mask = None, np.zeros((0, 0), np.int64)
            return keep
        mask = self.mask[keep]
        first = _leading(mask)
        self.cache = self.runner.cache_rows(self.cache, keep, -first, self.width,
                                            self._capacity(self.width - first, remaining))
        self.mask = mask[:, first:]
        return keep


class SlotRows:
    """Rows in host buffers of ``max_batch`` rows that the graph writes in place (the interface of
    ``MergedRows``). The runner gives ``slot_buffers(rows, capacity)`` (numpy arrays), ``slot_view(buffers, n)``
    (the first ``n`` rows as the graph's cache, bound without a copy, the arrays as its ``host``) and
    ``slot_copy(dst, dst_rows, dst_start, src, src_rows, src_start, length)``."""

    def __init__(self, runner, max_batch: int):
        self.runner, self.max_batch = runner, max_batch
        self.buffers, self.capacity = None, 0
        self.mask = np.zeros((0, 0), np.int64)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def cache(self):
        return None if self.buffers is None or not len(self.mask) else self.runner.slot_view(self.buffers,
                                                                                            len(self.mask))

    def prefill_cache(self, length: int, remaining: int):
        return self.runner.slot_view(self.runner.slot_buffers(1, length), 1)

    def step_cache(self):
        self._reserve(self.width + 1)
        return self.cache

    def stepped(self, cache) -> None:
        self.mask = np.pad(self.mask, ((0, 0), (0, 1)), constant_values=1)

    def join(self, cache, length: int, remaining: int) -> None:
        """Add one row, copied from ``cache`` (from ``prefill_cache``: ``length`` tokens in slots [0, length))."""
        n = len(self.mask)
        self._reserve(max(self.width, length) + remaining)
        if length > self.width and n:           # the joiner is wider than the batch: every row moves right
            self._shift(length - self.width)
        width = max(self.width, length)
        self.runner.slot_copy(self.buffers, [n], width - length, cache.host, [0], 0, length)
        row = np.zeros((1, width), np.int64)
        row[:, width - length:] = 1
        self.mask = np.concatenate([np.pad(self.mask, ((0, 0), (width - self.width, 0))), row])

    def leave(self, keep: list[int], remaining: int) -> list[int]:
        """Keep rows ``keep``: the last rows fill the holes the others leave. Returns which old row each new row
        is. (Leading slots no row reads stay until the buffers run out of slots.)"""
        n, kept = len(keep), set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, src in zip(holes, movers):
            order[hole] = src
        if holes:
            self.runner.slot_copy(self.buffers, holes, 0, self.buffers, movers, 0, self.width)
        self.mask = self.mask[order] if n else np.zeros((0, 0), np.int64)
        return order

    def _shift(self, shift: int) -> None:
        """Every row's slots moved by ``shift`` (> 0: empty slots added at the front, < 0: dropped), in place."""
        length = self.width - max(-shift, 0)
        rows = list(range(len(self.mask)))
        self.runner.slot_copy(self.buffers, rows, max(shift, 0), self.buffers, rows, max(-shift, 0), length)
        self.mask = np.pad(self.mask, ((0, 0), (shift, 0))) if shift > 0 else self.mask[:, -shift:]

    def _reserve(self, slots: int) -> None:
        """Room for ``slots`` slots: the leading slots no row reads dropped (every row moves), or when that is not
        enough, buffers reallocated with slack (the rows copied, without those slots)."""
        if slots <= self.capacity:
            return
        first = _unread(self.mask)
        if first and slots - first <= self.capacity:
            self._shift(-first)
            return
        slots -= first
        capacity = slots + slack(slots)
        buffers = self.runner.slot_buffers(self.max_batch, capacity)
        if len(self.mask):
            rows = list(range(len(self.mask)))
            self.runner.slot_copy(buffers, rows, 0, self.buffers, rows, first, self.width - first)
        self.buffers, self.capacity, self.mask = buffers, capacity, self.mask[:, first:]
