"""How long `lowbit compile demo --target onnx` takes, wall clock as a user sees it, against the onnxruntime-genai
builder on the same model folder, in one run and interleaved.

Each rep runs, in turn: `lowbit compile demo -r RECIPE -t onnx` with lowbit's own ONNX emitter (the default), the
same with `--onnx-exporter torch.onnx` (torch.export + torch.onnx.export of the same program), and
`python -m onnxruntime_genai.models.builder` (int4, block 64, accuracy level 4) on the demo folder. Prints the
median wall seconds (a fresh process each: imports included), lowbit's own step times from the manifest
(trace, export_onnx), and the ratios against the builder.

    python -m bench.export_time [--recipe rtn-w4g64] [--reps 3] [--no-torch-onnx]
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.export_time")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cpu import build_genai

from lowbit.demo.assets import ensure_assets
from lowbit.host import describe_cpu


def compile_once(recipe: str, exporter: str, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "compile", "demo", "-r", recipe, "-t", "onnx", "-o",
                           str(out), "--force", "-q", "--onnx-exporter", exporter], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"lowbit compile failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    m = json.loads((out / "manifest.json").read_text())
    return {"wall": wall, "trace": m["timings"]["trace"], "export": m["timings"]["export_onnx"],
            "exporter": m["onnx"]["exporter"], "mib": m["onnx"]["bytes"] / 2 ** 20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="rtn-w4g64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch-onnx", action="store_true", help="skip the torch.onnx exporter (about 70 s a rep)")
    args = ap.parse_args()
    model = ensure_assets()["model"]
    exporters = ["lowbit"] + ([] if args.no_torch_onnx else ["torch.onnx"])
    runs = {e: [] for e in exporters}
    builder = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for e in exporters:
                runs[e].append(compile_once(args.recipe, e, Path(tmp) / f"art-{e}"))
                print(f"rep {rep + 1}: lowbit {e}: {runs[e][-1]['wall']:.1f} s", file=sys.stderr)
            _, seconds = build_genai(model, Path(tmp) / "genai", rebuild=True)
            builder.append(seconds)
            print(f"rep {rep + 1}: builder: {seconds:.1f} s", file=sys.stderr)
    b = statistics.median(builder)
    print(f"\n`lowbit compile demo -r {args.recipe} -t onnx`, median of {args.reps}, each a fresh process\n"
          f"CPU: {describe_cpu()}\n")
    print("| exporter | wall s | trace s | ONNX export s | ONNX MiB | wall vs builder |")
    print("|---|---|---|---|---|---|")
    for e in exporters:
        med = {k: statistics.median(r[k] for r in runs[e]) for k in ("wall", "trace", "export", "mib")}
        used = {r["exporter"] for r in runs[e]}
        print(f"| {e}{'' if used == {e} else ' (fell back: ' + ','.join(sorted(used)) + ')'} | {med['wall']:.1f} | "
              f"{med['trace']:.1f} | {med['export']:.1f} | {med['mib']:.1f} | {med['wall'] / b:.2f}x |")
    print(f"| onnxruntime-genai builder (int4, block 64) | {b:.1f} | | | | 1.00x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
