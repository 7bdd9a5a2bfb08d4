"""Latency profiling of a loaded artifact through its runner (``start`` / ``step`` / ``full``), so it measures
whatever the runtime executes, on any backend.

Conventions follow trtexec and LLM serving benchmarks: untimed warm-up iterations for ``warmup_s``, then timed
iterations, a fixed count (``iterations``) or as many as fit in ``duration_s``. One iteration of a causal LM is a
prefill of ``prompt_len`` random tokens (time to first token) and ``new_tokens`` greedy decode steps, none of them
stopping early; an encoder's is one forward pass. Each run reports:

- ``prefill_ms`` (one sample per iteration), ``decode_ms_per_token`` (one sample per decode step: the step's time,
  whatever the batch), ``e2e_ms`` (prefill + every step + the argmax between them, per iteration), each as
  ``{count, mean, std, min, p<q>..., max}`` (``std`` the population standard deviation, percentiles by linear
  interpolation, as numpy's defaults);
- ``tokens_per_s``: generated tokens (batch x new tokens) per second of the mean end-to-end time;
- ``peak_memory_bytes``: CUDA, ``torch.cuda.max_memory_allocated`` over the timed iterations; CPU, the process's
  peak resident set size above its size when the run began (sampled every 2 ms);
- ``weight_bytes_per_step``: the matmul weight bytes one decode step reads (the artifact's
  ``sizes.matmul_bytes_after``; norms and the embedding rows it gathers are left out), and
  ``bandwidth_gb_s``: those bytes over the median decode step.

``per_layer`` then profiles one more prefill and a few decode steps by layer and op kind (``layer_breakdown``,
``breakdown.py``), after the timed iterations, so the timings above are the same with or without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.progress import progress_bar
from lowbit.version import __version__

PERCENTILES = (50, 90, 95, 99)
SUM_TOLERANCE = 0.15            # a breakdown whose rows miss more of the measured step than this is flagged


def stats(samples_ms: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> dict:
    """``{count, mean, std, min, p<q> for q in percentiles, max}`` of ``samples_ms`` (milliseconds)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise LowbitError("no timed samples to summarize")
    out = {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}
    for q in percentiles:
        out[f"p{q:g}"] = float(np.percentile(a, q))
    out["max"] = float(a.max())
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRss:
    """The process's peak resident set size above its size at ``__enter__``, sampled on a thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def _device(engine) -> torch.device:
    return torch.device(getattr(engine.runner, "device", "cpu"))


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_run(engine, batch: int, prompt_len: int, new_tokens: int):
    """A one-line LowbitError for a run the artifact cannot do."""
    if batch < 1:
        raise LowbitError(f"batch {batch}: a batch needs at least one sequence")
    if prompt_len < 1:
        raise LowbitError(f"prompt length {prompt_len}: a prompt needs at least one token")
    if new_tokens < 0:
        raise LowbitError(f"new tokens {new_tokens}: give 0 or more")
    if engine.task != "causal-lm" and new_tokens:
        raise LowbitError(f"'{engine.path}' is an encoder: it has no decode step; profile it with --new-tokens 0")
    if prompt_len + new_tokens > engine.max_positions:
        raise LowbitError(f"prompt length {prompt_len} + {new_tokens} new tokens exceeds the model's context of "
                          f"{engine.max_positions} positions; use a shorter prompt or fewer new tokens")


def _vocab(engine) -> int:
    tok = engine.tokenizer
    return int(getattr(tok, "vocab_size", None) or len(tok))


class _Greedy:
    """Greedy generation of a batch through a runner, one call per model step: ``prefill()``, then ``step()``s."""

    def __init__(self, runner, ids: torch.Tensor, new_tokens: int):
        self.runner, self.ids, self.new_tokens = runner, ids, new_tokens

    def prefill(self):
        self.mask = torch.ones_like(self.ids)
        self.positions = self.mask.cumsum(-1) - 1
        cache = self.runner.start(self.ids.shape[0], self.ids.shape[1] + self.new_tokens)
        logits, self.cache = self.runner.step(self.ids, self.mask, self.positions, cache)
        self.next = logits[:, -1].argmax(-1, keepdim=True).cpu()

    def step(self):
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)], 1)
        self.positions = self.positions[:, -1:] + 1
        logits, self.cache = self.runner.step(self.next, self.mask, self.positions, self.cache)
        self.next = logits[:, -1].argmax(-1, keepdim=True).cpu()


def _iteration(engine, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, list, float]:
    """(prefill ms, [decode ms per step], end-to-end ms) of one prefill + greedy decode."""
    t_start = time.perf_counter()
    if engine.task != "causal-lm":
        engine.runner.full(ids, torch.ones_like(ids))
        _sync(device)
        ms = (time.perf_counter() - t_start) * 1e3
        return ms, [], ms
    gen = _Greedy(engine.runner, ids, new_tokens)
    gen.prefill()
    _sync(device)
    prefill = (time.perf_counter() - t_start) * 1e3
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        gen.step()
        _sync(device)
        steps.append((time.perf_counter() - t0) * 1e3)
    return prefill, steps, (time.perf_counter() - t_start) * 1e3


def check_per_layer(engine):
    if _device(engine).type != "cpu":
        raise LowbitError(f"--per-layer: the breakdown runs on CPU so far, not on {_device(engine)}; profile without "
                          "--per-layer, or with --device cpu")


def _torch_profiled(fn, trace: Optional[list]) -> tuple[dict, float]:
    """(ms per (layer, kind), wall ms) of ``fn()`` under torch.profiler (the program instrumented by
    ``breakdown``); its Chrome-trace events are appended to ``trace`` unless it is None."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lowbit.tools.breakdown import times_ms

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _, wall = _timed(fn)
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json") as f:
                trace += json.load(f).get("traceEvents", [])
    return times_ms(prof.events()), wall


def _breakdown_torch(runner, prefill, decode, steps: int, want_trace: bool) -> tuple[dict, list, list]:
    from lowbit.tools.breakdown import instrumented

    plain = runner.gm
    runner.gm, order = instrumented(plain)
    trace = [] if want_trace else None
    try:
        prefill()                                                 # warm the instrumented program
        decode()
        phases = {"prefill": _torch_profiled(prefill, trace)}
        if steps:
            phases["decode"] = _torch_profiled(decode, trace)
    finally:
        runner.gm = plain
    return phases, list(dict.fromkeys(order)), trace or []


def _breakdown_ort(runner, prefill, decode, steps: int) -> tuple[dict, list, list]:
    """ONNX Runtime writes its trace either way; the caller keeps it only when asked."""
    import json
    import tempfile

    import onnx

    from lowbit.tools.breakdown import classify_onnx, ort_run_times

    plain = runner.session
    with tempfile.TemporaryDirectory() as tmp:
        optimized = f"{tmp}/optimized.onnx"
        runner.session = runner.new_session(runner.providers, profile_prefix=f"{tmp}/ort", optimized_model=optimized)
        try:
            prefill()
            decode()
            walls = {"prefill": _timed(prefill)[1]}
            if steps:
                walls["decode"] = _timed(decode)[1]
            trace_file = runner.session.end_profiling()
        finally:
            runner.session = plain
        labels = classify_onnx(onnx.load(optimized, load_external_data=False).graph)
        with open(trace_file) as f:
            trace = json.load(f)
        runs = ort_run_times(trace, labels)
    timed = runs[-(1 + steps):]                                   # after the warm-up's prefill and steps
    phases = {"prefill": (timed[0], walls["prefill"])}
    if steps:
        total: dict = {}
        for r in timed[1:]:
            for k, v in r.items():
                total[k] = total.get(k, 0.0) + v
        phases["decode"] = (total, walls["decode"])
    return phases, list(dict.fromkeys(labels.values())), trace


def _timed(fn) -> tuple:
    t0 = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - t0) * 1e3


def layer_breakdown(engine, ids: torch.Tensor, new_tokens: int,
                    trace_file: Optional[Path] = None) -> tuple[list, dict]:
    """Rows ``{"phase", "name", "kind", "ms", "percent"}`` of one prefill and of the mean decode step (over up to
    8 steps) by layer and op kind (``breakdown``: torch.profiler ranges in the torch program, ONNX Runtime's
    profiling trace of its kernels, plus its executor's time between them as ``onnxruntime`` / other), each phase
    closed by an ``overhead`` row (the profiled step's wall time minus the rows: the runner's own work and what the
    profiler does not see), with the wall ms of the profiled steps per phase. ``trace_file``: where to write the
    profilers' Chrome-trace JSON."""
    runner = engine.runner
    steps = min(new_tokens, 8)
    gen = _Greedy(runner, ids, new_tokens)

    def decode():
        for _ in range(steps):
            gen.step()

    with torch.inference_mode():
        if engine.backend == "ort":
            phases, order, trace = _breakdown_ort(runner, gen.prefill, decode, steps)
        else:
            phases, order, trace = _breakdown_torch(runner, gen.prefill, decode, steps, trace_file is not None)
    if trace_file is not None:
        import json

        Path(trace_file).parent.mkdir(parents=True, exist_ok=True)
        Path(trace_file).write_text(json.dumps({"traceEvents": trace}))
    rows, profiled = [], {}
    for phase, (ms, wall) in phases.items():
        per = 1 if phase == "prefill" else steps
        profiled[phase] = wall / per
        mine = [{"phase": phase, "name": label, "kind": kind, "ms": ms[(label, kind)] / per}
                for label, kind in sorted(ms, key=lambda k: order.index(k) if k in order else len(order))]
        mine.append({"phase": phase, "name": "overhead", "kind": "overhead",
                     "ms": profiled[phase] - sum(r["ms"] for r in mine)})
        for r in mine:
            r["percent"] = 100 * r["ms"] / profiled[phase]
        rows += mine
    return rows, profiled


def profile_run(engine, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64, warmup_s: float = 2.0,
                duration_s: float = 10.0, iterations: Optional[int] = None,
                percentiles: Sequence[float] = PERCENTILES, seed: int = 0, quiet: bool = False,
                per_layer: bool = False, trace_file: Optional[Path] = None) -> dict:
    """One run (see the module docstring) of a loaded engine; ``per_layer`` adds ``layers`` (``layer_breakdown``)
    and ``layers_profiled_ms`` (the instrumented, profiled step's wall time: the profiler's own cost is its excess
    over the median)."""
    check_run(engine, batch, prompt_len, new_tokens)
    if per_layer:
        check_per_layer(engine)
    percentiles = sorted(set(percentiles) | {50})         # the median is what the ratios compare
    if iterations is not None and iterations < 1:
        raise LowbitError(f"iterations {iterations}: give at least 1")
    if duration_s <= 0 and iterations is None:
        raise LowbitError(f"duration {duration_s} s: give a positive duration or an iteration count")
    device = _device(engine)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(100, _vocab(engine) - 1), _vocab(engine), (batch, prompt_len), generator=g)
    with torch.inference_mode():
        t_end = time.perf_counter() + warmup_s
        _iteration(engine, ids, min(new_tokens, 2), device)       # at least one, whatever the warm-up time
        while time.perf_counter() < t_end:
            _iteration(engine, ids, new_tokens, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, decode, e2e = [], [], []
        what = f"{Path(engine.path).name} b{batch} p{prompt_len}"
        bar = progress_bar(None, f"profile {what}", disable=quiet, total=iterations)
        with _PeakRss() as rss:
            t_end = time.perf_counter() + duration_s
            while (len(e2e) < iterations) if iterations is not None else (not e2e or time.perf_counter() < t_end):
                p, steps, total = _iteration(engine, ids, new_tokens, device)
                prefill.append(p)
                decode.extend(steps)
                e2e.append(total)
                bar.update(1)
        bar.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.delta
    sizes = engine.manifest.get("sizes", {})
    weight_bytes = sizes.get("matmul_bytes_after") if engine.task == "causal-lm" else None
    decode_stats = stats(decode, percentiles) if decode else None
    median_step_s = float(np.median(decode)) / 1e3 if decode else None
    run = {
        "artifact": str(engine.path), "recipe": engine.manifest.get("recipe", {}).get("name"),
        "backend": engine.backend, "device": str(device), "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "iterations": len(e2e),
        "prefill_ms": stats(prefill, percentiles), "decode_ms_per_token": decode_stats,
        "e2e_ms": stats(e2e, percentiles),
        "tokens_per_s": batch * new_tokens / (float(np.mean(e2e)) / 1e3) if new_tokens else None,
        "peak_memory_bytes": int(peak), "weight_bytes_per_step": weight_bytes,
        "bandwidth_gb_s": weight_bytes / median_step_s / 1e9 if weight_bytes and median_step_s else None,
    }
    if per_layer:
        run["layers"], run["layers_profiled_ms"] = layer_breakdown(engine, ids, new_tokens, trace_file)
        measured = run["layers_profiled_ms"]
        if trace_file is not None:
            run["trace_file"] = str(trace_file)
        for phase, outside in unexplained(run["layers"], measured).items():
            if abs(outside) > SUM_TOLERANCE:
                print(f"lowbit: the {phase} breakdown of {what} leaves {100 * outside:+.0f}% of the profiled "
                      f"{measured[phase]:.2f} ms step outside its rows (more than {100 * SUM_TOLERANCE:.0f}%)",
                      file=sys.stderr)
    return run


def unexplained(rows: list, measured_ms: dict) -> dict:
    """Per phase, the share of the measured step that the breakdown's rows (overhead excluded) do not account for:
    (measured - sum) / measured, negative when the rows add up to more."""
    out = {}
    for phase, ms in measured_ms.items():
        total = sum(r["ms"] for r in rows if r["phase"] == phase and r["kind"] != "overhead")
        out[phase] = (ms - total) / ms
    return out


def check_output(path, flag: str, folder: bool):
    """Refuse, before any run, a --trace file or --plot folder that could only fail to be written after the
    profiling: a path of the other kind, or one under no folder this user can write to."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        want = "a folder" if folder else f"a file name, e.g. {p / 'trace.json'}"
        raise LowbitError(f"{flag} '{path}' is an existing {'file' if folder else 'folder'}; give {want}")
    existing = Path(os.path.abspath(p if folder else p.parent))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LowbitError(f"{flag} '{path}': cannot write under '{existing}'; give a path in a folder you can "
                          "write to")


def host_info() -> dict:
    from lowbit.host import describe_cpu

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": describe_cpu(), "gpu": gpu, "torch": torch.__version__, "onnxruntime": ort_version}


def profile(artifacts, backend: str = "auto", device: str = "cpu", batches: Sequence[int] = (1,),
            prompt_lens: Sequence[int] = (128,), new_tokens: Optional[int] = None, warmup_s: float = 2.0,
            duration_s: float = 10.0, iterations: Optional[int] = None,
            percentiles: Sequence[float] = PERCENTILES, quiet: bool = False, per_layer: bool = False,
            trace: Optional[str] = None, plot_dir: Optional[str] = None, **load_kw) -> dict:
    """Profile one or more artifacts (folders or loaded engines) at every (batch, prompt length):
    ``{"lowbit_version", "host", "runs": [...]}`` (runs in artifact, batch, prompt length order).
    ``new_tokens``: decode steps per iteration (default 64 for causal LMs, 0 for encoders)."""
    import lowbit

    if isinstance(artifacts, (str, Path)) or hasattr(artifacts, "runner"):
        artifacts = [artifacts]
    if not artifacts:
        raise LowbitError("no artifact to profile")
    for b in batches:
        if b < 1:
            raise LowbitError(f"batch {b}: a batch needs at least one sequence")
    bad = [q for q in percentiles if not 0 <= q <= 100]
    if bad:
        raise LowbitError(f"percentile {bad[0]} is outside 0..100")
    if trace is not None:
        check_output(trace, "--trace", folder=False)
    if plot_dir is not None:
        check_output(plot_dir, "--plot", folder=True)
    engines = [a if hasattr(a, "runner") else lowbit.load(a, backend=backend, device=device, **load_kw)
               for a in artifacts]
    plan = []
    for eng in engines:
        n = new_tokens if new_tokens is not None else (64 if eng.task == "causal-lm" else 0)
        for b in batches:
            for p in prompt_lens:
                check_run(eng, b, p, n)
                plan.append((eng, b, p, n))
        if per_layer:
            check_per_layer(eng)
    if plot_dir is not None:
        from lowbit.tools.profile_plots import check_matplotlib

        check_matplotlib()                                        # before the runs, not after them
    traces = [None] * len(plan)
    if trace is not None:
        if not per_layer:
            raise LowbitError("--trace writes the profiled steps of --per-layer; add --per-layer")
        base = Path(trace)
        traces = [base if len(plan) == 1 else base.with_name(
            f"{base.stem}-{Path(eng.path).name}-{eng.backend}-b{b}-p{p}{base.suffix}") for eng, b, p, _ in plan]
    runs = [profile_run(eng, b, p, n, warmup_s, duration_s, iterations, percentiles, quiet=quiet,
                        per_layer=per_layer, trace_file=t) for (eng, b, p, n), t in zip(plan, traces)]
    doc = {"lowbit_version": __version__, "host": host_info(), "runs": runs}
    if plot_dir is not None:
        from lowbit.tools.profile_plots import write_plots

        doc["plots"] = [str(f) for f in write_plots(doc, plot_dir)]
    return doc


def format_table(doc: dict) -> str:
    """A markdown table of the runs, with decode and prefill ratios against the first artifact's run at the same
    batch and prompt length."""
    first = {}
    for r in doc["runs"]:
        first.setdefault((r["batch"], r["prompt_len"]), r)
    head = ("| artifact | backend | batch | prompt | prefill p50 ms | decode p50 ms/token | decode p90 | e2e p50 ms | "
            "tokens/s | peak MiB | GB/s | decode vs first | prefill vs first |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in doc["runs"]:
        base = first[(r["batch"], r["prompt_len"])]
        d, bd = r["decode_ms_per_token"], base["decode_ms_per_token"]
        lines.append("| " + " | ".join([
            Path(r["artifact"]).name, r["backend"], str(r["batch"]), str(r["prompt_len"]),
            num(r["prefill_ms"]["p50"]), num(d and d.get("p50")), num(d and d.get("p90")), num(r["e2e_ms"]["p50"]),
            num(r["tokens_per_s"], "{:.1f}"), num(r["peak_memory_bytes"] / 2 ** 20, "{:.1f}"),
            num(r["bandwidth_gb_s"]),
            num(bd["p50"] / d["p50"] if d and bd else None, "{:.2f}x"),
            num(base["prefill_ms"]["p50"] / r["prefill_ms"]["p50"], "{:.2f}x")]) + " |")
    host = doc["host"]
    out = [f"host: {host['cpu']}; gpu: {host['gpu'] or 'none'}; torch {host['torch']}, onnxruntime "
           f"{host['onnxruntime'] or 'not installed'}", "", *lines]
    for r in doc["runs"]:
        if r.get("layers"):
            out += ["", *format_layers(r)]
    return "\n".join(out)


def format_layers(run: dict) -> list[str]:
    """A run's breakdown as one table per phase: a row per layer, ms per op kind, the overhead last."""
    from lowbit.tools.breakdown import KINDS

    lines = []
    for phase in ("prefill", "decode"):
        rows = [r for r in run["layers"] if r["phase"] == phase]
        if not rows:
            continue
        names = list(dict.fromkeys(r["name"] for r in rows))
        lines += [f"{Path(run['artifact']).name} b{run['batch']} p{run['prompt_len']}: one {phase} step by layer "
                  f"(ms; profiled step {run['layers_profiled_ms'][phase]:.2f} ms)", "",
                  "| layer | " + " | ".join(KINDS) + " | total | % |", "|---|" + "---|" * (len(KINDS) + 2)]
        for name in names:
            mine = [r for r in rows if r["name"] == name]
            by_kind = {r["kind"]: r["ms"] for r in mine}
            total = sum(by_kind.values())
            lines.append(f"| {name} | " + " | ".join(f"{by_kind[k]:.3f}" if k in by_kind else "" for k in KINDS)
                         + f" | {total:.3f} | {sum(r['percent'] for r in mine):.1f} |")
        kinds = {k: sum(r["ms"] for r in rows if r["kind"] == k) for k in KINDS}
        lines.append("| **all layers** | " + " | ".join(f"{v:.3f}" for v in kinds.values())
                     + f" | {sum(kinds.values()):.3f} | {sum(r['percent'] for r in rows if r['kind'] in KINDS):.1f} |")
        lines.append("")
    return lines
