"""Progress display for long steps (stderr, so --json output on stdout stays clean)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm


def progress_bar(iterable, desc: str, disable: bool = False, total=None):
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5)


def say(msg: str, quiet: bool = False):
    if not quiet:
        print(f"lowbit: {msg}", file=sys.stderr, flush=True)


@contextmanager
def timed(timings: dict, key: str, quiet: bool = False, what: str | None = None):
    """Time a step into ``timings[key]`` (seconds) and announce it on stderr."""
    if what:
        say(f"{what} ...", quiet)
    t0 = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t0, 3)
    if what:
        say(f"{what} done in {timings[key]:.1f}s", quiet)
