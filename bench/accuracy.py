"""Accuracy tables on the demo assets: LM perplexity (FP, RTN, GPTQ, ZeroQuant) and encoder embedding cosine.

    python -m bench.accuracy                      # every LM recipe and the encoder rows, the whole eval.txt
    python -m bench.accuracy --set zeroquant      # only the ZeroQuant rows (LM and encoder)
    python -m bench.accuracy --set awq            # RTN, AWQ, GPTQ and AWQ + GPTQ at w4g128, w4g64, w3g64, w2g64
    python -m bench.accuracy --set rotate         # rotations, then GPTQ (and AWQ + GPTQ), at the same formats
    python -m bench.accuracy --set rounding       # RTN and learnt rounding ("ar-") at the same formats
    python -m bench.accuracy --set budget         # size-budget plans: RECIPE@BITS, e.g. gptq-w4g64@3.5
    python -m bench.accuracy --recipes rtn-w4g64 --max-windows 40 --json out/acc.json

Each row: recipe, perplexity, ratio to FP, quantization time (the pass, calibration forward included),
size of the quantized layers and of the whole weights file. The FP row uses the float model folder.
"awq-" rows scale activations (AWQ) on the same calibration windows before RTN or GPTQ; "rot-" rows rotate the
residual stream and values first; "RECIPE@BITS" rows plan each layer's format within BITS stored bits per weight
(``--budget-bits``). Their quantize time includes the scaling, rotation and planning.
GPTQ rows calibrate on --calib-samples random 512-token windows of calib.txt (seed 0); "-noact" is the
paper's column order, "-mse" adds the clipping search for scales. ZeroQuant "-lkd" rows distil, and "ar-" rows
learn their rounding, with the recipe's defaults on calib.txt; their LKD time is its own column. Encoder rows
compile the demo encoder (MiniLM-L6) and report the mean cosine similarity of mean-pooled sentence embeddings to
the float encoder over --sentences sentences of eval.txt.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.accuracy")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lowbit
from lowbit.demo.assets import ensure_assets
from lowbit.format.artifact import read_manifest
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.cli import run_script
from lowbit.tools.eval import evaluate_perplexity

SETS = {
    "gptq": ["rtn-w8", "rtn-w4g128", "gptq-w4g128", "gptq-w4g128-noact",
             "rtn-w4g64", "rtn-w4g64-mse", "gptq-w4g64", "gptq-w4g64-noact", "gptq-w4g64-mse",
             "rtn-w3g64", "rtn-w3g64-mse", "gptq-w3g64", "gptq-w3g64-noact", "gptq-w3g64-mse"],
    "awq": [f"{m}-w{b}" for b in ("4g128", "4g64", "3g64", "2g64") for m in ("rtn", "awq", "gptq", "awq-gptq")],
    "rotate": [f"{m}-w{b}" for b in ("4g128", "4g64", "3g64", "2g64") for m in ("rot-gptq", "rot-awq-gptq")],
    "rounding": [f"{m}-w{b}" for b in ("4g128", "4g64", "3g64", "2g64") for m in ("rtn", "ar")],
    "budget": ["rtn-w4g64@3.875", "gptq-w4g64@3.5", "awq-gptq-w4g64@3.5", "awq-gptq-w4g64@3.875"],
    "zeroquant": ["zq-w8a8", "zq-w8a8-lkd", "zq-w4a16-mixed", "zq-w4a16-mixed-lkd", "zq-w4a8-mixed",
                  "zq-w4a8-mixed-lkd"],
}
ENCODER_SETS = {"gptq": [], "awq": [], "rotate": [], "rounding": [], "budget": [],
                "zeroquant": ["rtn-w8", "zq-w8a8", "zq-w4a16-mixed", "zq-w4a8-mixed", "zq-w4a8-mixed-lkd"]}


def run(recipes, seq_len: int, max_windows, workdir: Path, calib, model: str = "demo") -> list[dict]:
    paths = ensure_assets()
    folder = paths["model"] if model == "demo" else model
    rows = []
    t0 = time.perf_counter()
    fp = evaluate_perplexity(model, paths["eval"], seq_len=seq_len, max_windows=max_windows)
    model_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    rows.append({"recipe": "fp", "ppl": fp["ppl"], "ratio": 1.0, "quant_s": 0.0, "layers_mib": None,
                 "file_mib": model_bytes / 2**20, "eval_s": time.perf_counter() - t0, "tokens": fp["tokens"]})
    for name in recipes:
        recipe, _, bits = name.partition("@")
        art = workdir / (Path(recipe).stem + (f"@{bits}" if bits else ""))     # a recipe file: its stem, in the workdir
        lowbit.compile(model, recipe=recipe, out=art, force=True, quiet=True, calib=calib,
                       budget_bits=float(bits) if bits else None)
        m = read_manifest(art)
        quant_s = sum(v for k, v in m["timings"].items() if k.startswith("pass_") or k in ("awq", "rotate", "budget"))
        lkd_s = m["timings"].get("lkd", 0.0)
        t0 = time.perf_counter()
        r = evaluate_perplexity(str(art), paths["eval"], seq_len=seq_len, max_windows=max_windows)
        rows.append({"recipe": name, "ppl": r["ppl"], "ratio": r["ppl"] / fp["ppl"], "quant_s": quant_s,
                     "lkd_s": lkd_s,
                     "layers_mib": m["sizes"]["quantized_bytes_after"] / 2**20,
                     "layers_before_mib": m["sizes"]["quantized_bytes_before"] / 2**20,
                     "file_mib": m["sizes"]["weights_file_bytes"] / 2**20,
                     "eval_s": time.perf_counter() - t0, "tokens": r["tokens"]})
        print(f"{name}: ppl {r['ppl']:.3f}", file=sys.stderr, flush=True)
    return rows


def run_encoder(recipes, workdir: Path, sentences: int) -> list[dict]:
    from lowbit.tools.eval import evaluate_embeddings

    paths = ensure_assets()
    rows = []
    for name in recipes:
        art = workdir / f"encoder-{name}"
        lowbit.compile("demo-encoder", recipe=name, out=art, force=True, quiet=True)
        m = read_manifest(art)
        r = evaluate_embeddings(str(art), paths["eval"], max_sentences=sentences, show_progress=False)
        rows.append({"recipe": name, **r, "lkd_s": m["timings"].get("lkd", 0.0),
                     "layers_mib": m["sizes"]["quantized_bytes_after"] / 2**20,
                     "layers_before_mib": m["sizes"]["quantized_bytes_before"] / 2**20})
        print(f"encoder {name}: cosine {r['cosine_mean']:.5f}", file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    out = ["| recipe | perplexity | vs FP | quantize time | LKD time | quantized layers | weights file |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        layers = "float" if r["layers_mib"] is None else f"{r['layers_before_mib']:.1f} -> {r['layers_mib']:.1f} MiB"
        lkd = f"{r['lkd_s']:.0f}s" if r.get("lkd_s") else "-"
        out.append(f"| {r['recipe']} | {r['ppl']:.3f} | {r['ratio']:.3f}x | {r['quant_s']:.1f}s | {lkd} | {layers} | "
                   f"{r['file_mib']:.1f} MiB |")
    return "\n".join(out)


def markdown_encoder(rows) -> str:
    out = ["| recipe | mean cosine to FP | min cosine | sentences | LKD time | quantized layers |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        lkd = f"{r['lkd_s']:.0f}s" if r.get("lkd_s") else "-"
        out.append(f"| {r['recipe']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['sentences']} | {lkd} | "
                   f"{r['layers_before_mib']:.1f} -> {r['layers_mib']:.1f} MiB |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=[*SETS, "all"], default="all", help="which rows (default all)")
    ap.add_argument("--model", default="demo", choices=["demo", "gemma-3-270m"],
                    help="the LM: the demo SmolLM2-135M, or Gemma-3-270M (bench/second_model.py; no encoder rows)")
    ap.add_argument("--recipes", nargs="*", default=None, help="LM recipes (default: the --set's)")
    ap.add_argument("--encoder-recipes", nargs="*", default=None, help="encoder recipes (default: the --set's)")
    ap.add_argument("--sentences", type=int, default=256, help="eval.txt sentences for the encoder cosine")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = the whole eval.txt")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--workdir", help="keep the artifacts here (default: a temp folder)")
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration windows of calib.txt")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    a = ap.parse_args()
    calib = CalibrationArgs("demo", a.calib_samples, a.calib_seq_len, seed=0)
    sets = list(SETS) if a.set == "all" else [a.set]
    recipes = a.recipes if a.recipes is not None else [r for s in sets for r in SETS[s]]
    enc_recipes = a.encoder_recipes if a.encoder_recipes is not None else [r for s in sets for r in ENCODER_SETS[s]]
    model, title = "demo", "SmolLM2-135M-Instruct"
    if a.model == "gemma-3-270m":
        from bench.second_model import ensure_gemma3_270m

        model, title, enc_recipes = str(ensure_gemma3_270m()), "Gemma-3-270M", []
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(recipes, a.seq_len, a.max_windows or None, Path(a.workdir or tmp), calib, model)
        enc_rows = run_encoder(enc_recipes, Path(a.workdir or tmp), a.sentences)
    print(f"\n{title}, demo eval.txt, {rows[0]['tokens']} predicted tokens in {a.seq_len}-token "
          f"windows; GPTQ calibrated on {a.calib_samples} x {a.calib_seq_len} tokens of calib.txt\n")
    print(markdown(rows))
    if enc_rows:
        print(f"\nMiniLM-L6 (demo encoder): cosine of mean-pooled sentence embeddings to the float encoder, "
              f"{enc_rows[0]['sentences']} sentences of eval.txt\n")
        print(markdown_encoder(enc_rows))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"lm": rows, "encoder": enc_rows}, indent=1))
    return 0


if __name__ == "__main__":
    run_script(main, "accuracy")
