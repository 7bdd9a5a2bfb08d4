"""How far two backends of one artifact may differ in perplexity by float rounding alone: the yardstick.

Per-token INT8 activations turn tiny float differences into different codes, so a W8A8 model's perplexity moves
with rounding noise. This scores each eval.txt window on the torch backend (``--kernels reference``, the oracle),
then again with ``--noise`` relative Gaussian noise on its embedding table (``--draws`` draws), and on ONNX
Runtime when the artifact has an ONNX model: per-window and mean perplexity differences against the torch
backend. A backend difference inside the noise draws' spread is rounding, not a lowering error.

    python -m bench.parity_noise                       # zq-w8a8 --target onnx and --target tensorrt, 8 x 256
    python -m bench.parity_noise --recipe rtn-w4g64 --windows 4 --draws 2
    python -m bench.parity_noise --model gemma-3-270m --targets onnx --windows 10 --seq-len 512 --draws 2
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

import lowbit
from bench.second_model import ensure_gemma3_270m
from lowbit.cli import run_script
from lowbit.demo.assets import ensure_assets
from lowbit.metrics import perplexity, read_text, windows
from lowbit.host import describe_cpu


def window_nll(engine, wins: torch.Tensor) -> list:
    """Each window's mean token NLL, by lowbit.tools.eval's perplexity on that window alone."""
    return [perplexity(engine.forward, w[None], show_progress=False)["nll"] for w in wins]


def row(label: str, nll: list, base: list) -> str:
    """A table row: the mean-perplexity and per-window perplexity ratios against ``base``, minus 1, in percent."""
    per = " ".join(f"{100 * (math.exp(a - b) - 1):+.2f}" for a, b in zip(nll, base))
    return f"| {label} | {100 * (math.exp(statistics.fmean(nll) - statistics.fmean(base)) - 1):+.2f} | {per} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=["demo", "gemma-3-270m"],
                    help="the demo LM or Gemma-3-270M (bench.second_model builds it)")
    ap.add_argument("--recipe", default="zq-w8a8")
    ap.add_argument("--targets", default="onnx,tensorrt", help="comma list of targets with an ONNX model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--noise", type=float, default=1e-6, help="relative noise on the embedding table")
    ap.add_argument("--out", default="out/parity-noise")
    args = ap.parse_args()
    paths = ensure_assets(quiet=True)
    model = "demo" if args.model == "demo" else str(ensure_gemma3_270m(quiet=True))
    prefix = "" if args.model == "demo" else f"{args.model}-"
    arts = {t: lowbit.compile(model, args.recipe, out=Path(args.out) / f"{prefix}{args.recipe}-{t}", target=t,
                              force=True, quiet=True, **({"trt_precision": "float32"} if t == "tensorrt" else {}))
            for t in args.targets.split(",")}
    # The torch backend once: every target ships the same program to it.
    torch_engine = lowbit.load(next(iter(arts.values())), backend="torch", kernels="reference")
    wins = windows(torch_engine.tokenizer, read_text(paths["eval"]), args.seq_len, args.windows)
    base = window_nll(torch_engine, wins)
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}; {args.model}, {args.recipe}, {args.windows} windows x "
          f"{args.seq_len} of eval.txt; ratios to the torch backend (reference kernels), percent\n")
    print("| run | mean | per window |\n|---|---|---|")
    gm = torch_engine.runner.gm
    table = next(t for n, t in itertools.chain(gm.named_parameters(), gm.named_buffers()) if "embed" in n)
    clean, gen = table.detach().clone(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in range(args.draws):
            table.copy_(clean * (1 + args.noise * torch.randn(clean.shape, generator=gen)))
            print(row(f"torch, {args.noise:g} noise, draw {d}", window_nll(torch_engine, wins), base))
        table.copy_(clean)
    for target, art in arts.items():
        print(row(f"ort, --target {target}", window_nll(lowbit.load(art, backend="ort"), wins), base))
    return 0


if __name__ == "__main__":
    run_script(main, "parity_noise")
