"""What a size budget costs, estimated without compiling: each recipe's plan (passes/budget.py) on the demo LM at
several budgets, as the estimated perplexity against float on the plan's calibration windows.

    python -m bench.budget --recipes gptq-w4g64 rtn-w4g64

One measurement per recipe (the Fisher pass, then the streaming pass that rounds each layer in every format the
recipe's way); every budget's plan comes from it. ``lowbit compile ... --budget-bits B`` records the same estimates
in its manifest and report; ``lowbit eval`` then measures the plan it chose.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.budget")

import argparse
import json
import time
from pathlib import Path

from lowbit.cli import run_script


def main() -> int:
    from lowbit.compiler.pipeline import CalibrationArgs
    from lowbit.demo.assets import ensure_assets
    from lowbit.frontend.load import load_model, load_tokenizer, max_positions
    from lowbit.frontend.trace import trace
    from lowbit.ir.calibration import calibration_windows
    from lowbit.metrics import read_text
    from lowbit.passes.budget import FORMATS, OTHER_BUDGETS, plan
    from lowbit.passes.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["gptq-w4g64", "rtn-w4g64"])
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args()
    recipes = [load_recipe(r) for r in a.recipes]             # a bad name is one line before any work
    model = Path(ensure_assets()["model"])
    loaded = load_model(str(model))
    graph = trace(loaded)
    c = CalibrationArgs()                                        # the compile's default windows
    ids = calibration_windows(load_tokenizer(model), read_text(c.text, "calib"), c.samples, c.seq_len, c.seed,
                              max_positions(loaded.config))
    rows = []
    for recipe in recipes:
        t0 = time.perf_counter()
        _, report = plan(graph, recipe, ids, list(FORMATS), OTHER_BUDGETS[0], show_progress=False)
        rows.append({"recipe": recipe.name, "seconds": round(time.perf_counter() - t0), **report["other_budgets"]})
        print(f"{recipe.name}: measured in {rows[-1]['seconds']} s", flush=True)
    print("\nestimated perplexity against float, demo LM, 32 x 512 calibration tokens of calib.txt\n")
    print("| recipe | " + " | ".join(f"{b:g} bits" for b in OTHER_BUDGETS) + " |")
    print("|---|" + "---|" * len(OTHER_BUDGETS))
    for row in rows:
        print(f"| {row['recipe']} | " + " | ".join(f"{row[f'{b:g}']:.3f}x" if f"{b:g}" in row else "-"
                                                   for b in OTHER_BUDGETS) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    run_script(main, "budget")
