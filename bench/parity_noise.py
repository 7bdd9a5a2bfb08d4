"""How far two backends of one artifact may differ in perplexity by float rounding alone: the yardstick.

Per-token INT8 activations turn tiny float differences into different codes, so a W8A8 model's perplexity moves
with rounding noise. This scores each eval.txt window on the torch backend (``--kernels reference``, the oracle),
then again with ``--noise`` relative Gaussian noise on its embedding table (``--draws`` draws), and on ONNX
Runtime when the artifact has an ONNX model: per-window and mean perplexity differences against the torch
backend. A backend difference inside the noise draws' spread is rounding, not a lowering error.

    python -m bench.parity_noise                       # zq-w8a8 --target onnx and --target tensorrt, 8 x 256
    python -m bench.parity_noise --recipe rtn-w4g64 --windows 4 --draws 2
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.parity_noise")

import argparse
import itertools
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.cli import run_script
from lowbit.demo.assets import ensure_assets
from lowbit.eval import read_text, windows
from lowbit.host import describe_cpu


def window_nll(engine, wins: torch.Tensor) -> list:
    out = []
    for w in wins:
        logits = torch.as_tensor(engine.forward(w[None])).float()[0]
        out.append(float(F.cross_entropy(logits[:-1], w[1:])))
    return out


def diffs(nll: list, base: list) -> tuple:
    """(per-window perplexity ratios - 1, mean-perplexity ratio - 1), in percent."""
    per = [100 * (math.exp(a - b) - 1) for a, b in zip(nll, base)]
    return per, 100 * (math.exp(statistics.fmean(nll) - statistics.fmean(base)) - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="zq-w8a8")
    ap.add_argument("--targets", default="onnx,tensorrt", help="comma list of targets with an ONNX model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--noise", type=float, default=1e-6, help="relative noise on the embedding table")
    ap.add_argument("--out", default="out/parity-noise")
    args = ap.parse_args()
    paths = ensure_assets(quiet=True)
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}; {args.recipe}, {args.windows} windows x "
          f"{args.seq_len} of eval.txt; ratios to the torch backend (reference kernels), percent\n")
    print("| run | mean | per window |\n|---|---|---|")
    base_art = None
    for target in args.targets.split(","):
        extra = {"trt_precision": "float32"} if target == "tensorrt" else {}
        art = lowbit.compile("demo", args.recipe, out=Path(args.out) / f"{args.recipe}-{target}", target=target,
                             force=True, quiet=True, **extra)
        torch_engine = lowbit.load(art, backend="torch", kernels="reference")
        wins = windows(torch_engine.tokenizer, read_text(paths["eval"]), args.seq_len, args.windows)
        base = window_nll(torch_engine, wins)
        if base_art is None:      # the yardstick once: every target ships the same program to the torch backend
            base_art = art
            gm = torch_engine.runner.gm
            table = next(t for n, t in itertools.chain(gm.named_parameters(), gm.named_buffers()) if "embed" in n)
            clean, gen = table.detach().clone(), torch.Generator().manual_seed(0)
            for d in range(args.draws):
                with torch.no_grad():
                    table.copy_(clean * (1 + args.noise * torch.randn(clean.shape, generator=gen)))
                per, mean = diffs(window_nll(torch_engine, wins), base)
                print(f"| torch, {args.noise:g} noise, draw {d} | {mean:+.2f} | {' '.join(f'{x:+.2f}' for x in per)} |")
            with torch.no_grad():
                table.copy_(clean)
        per, mean = diffs(window_nll(lowbit.load(art, backend="ort"), wins), base)
        print(f"| ort, --target {target} | {mean:+.2f} | {' '.join(f'{x:+.2f}' for x in per)} |")
    return 0


if __name__ == "__main__":
    run_script(main, "parity_noise")
