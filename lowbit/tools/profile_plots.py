"""PNG plots of a ``lowbit profile`` document (``--plot DIR``; matplotlib is an optional dependency)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError


NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install matplotlib (or lowbit[plot])"


def check_matplotlib():
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise LowbitError(NEEDS_MATPLOTLIB)


def _series(runs: list, x: str, group: tuple) -> dict:
    """{(group values): [(x, run), ...] sorted by x}."""
    out: dict = {}
    for r in runs:
        out.setdefault(tuple(r[g] for g in group), []).append((r[x], r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _name(r: dict) -> str:
    return f"{Path(r['artifact']).name} ({r['backend']})"


def write_plots(doc: dict, out_dir) -> list[Path]:
    """latency_vs_batch.png, latency_vs_prompt.png and, for runs with ``layers``, breakdown.png in ``out_dir``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowbitError(NEEDS_MATPLOTLIB) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, files = doc["runs"], []
    for x, group, label, fname in (("batch", ("artifact", "backend", "prompt_len"), "prompt {}", "latency_vs_batch"),
                                   ("prompt_len", ("artifact", "backend", "batch"), "batch {}", "latency_vs_prompt")):
        fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, points in _series(runs, x, group).items():
            tag = f"{_name(points[0][1])}, {label.format(key[2])}"
            xs = [p[0] for p in points]
            if all(p[1]["decode_ms_per_token"] for p in points):
                ax_d.plot(xs, [p[1]["decode_ms_per_token"]["p50"] for p in points], marker="o", label=tag)
            ax_p.plot(xs, [p[1]["prefill_ms"]["p50"] for p in points], marker="o", label=tag)
        xlabel = "batch size (sequences)" if x == "batch" else "prompt length (tokens)"
        ticks = sorted({r[x] for r in runs})
        for ax, title in ((ax_d, "decode, median ms per step"), (ax_p, "prefill, median ms")):
            ax.set_xticks(ticks)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out_dir / f"{fname}.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    with_layers = [r for r in runs if r.get("layers")]
    if with_layers:
        from lowbit.tools.breakdown import KINDS

        phases = [p for p in ("prefill", "decode") if any(x["phase"] == p for r in with_layers for x in r["layers"])]
        width = max(6.0, 1.2 * len(with_layers))
        fig, axes = plt.subplots(1, len(phases), figsize=(width * len(phases), 5.5), squeeze=False)
        labels = [f"{_name(r)}\nb{r['batch']} p{r['prompt_len']}" for r in with_layers]
        for ax, phase in zip(axes[0], phases):
            bottom = [0.0] * len(with_layers)
            for kind in (*KINDS, "overhead"):
                ms = [max(0.0, sum(x["ms"] for x in r["layers"] if x["phase"] == phase and x["kind"] == kind))
                      for r in with_layers]
                ax.bar(range(len(with_layers)), ms, bottom=bottom, label=kind)
                bottom = [b + m for b, m in zip(bottom, ms)]
            ax.set_xticks(range(len(with_layers)), labels, fontsize=8, rotation=30, ha="right")
            ax.set_ylabel("ms per step")
            ax.set_title(f"one {phase} step by op kind")
            ax.legend(fontsize=8, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files.append(out_dir / "breakdown.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files
