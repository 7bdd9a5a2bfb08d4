"""The TensorRT target on the demo LM, without TensorRT: perplexity of the TensorRT-dialect ONNX run in ONNX Runtime
(plugin nodes on their reference implementations) against the torch backend of the same artifact, and what the
asymmetric INT4 fold costs in weight bytes.

For each recipe and precision: `lowbit compile demo -r RECIPE -t tensorrt --trt-precision P`, then perplexity on
the first N windows of eval.txt with `--backend torch --kernels reference` (float32, the oracle) and
`--backend ort` (the TensorRT ONNX in ONNX Runtime's CPU provider). Also reads the ONNX's initializers: INT4 codes,
their scales, and the fold matrices ``s * (8 - z)`` of asymmetric weights (the extra bytes a decode step reads
for folding zero points instead of a zero-point plugin).

    python -m bench.tensorrt_onnx [--recipes rtn-w4g64-sym,rtn-w4g64,zq-w8a8,gptq-w4g128@float16]
                                  [--precisions float32,float16] [--windows 8] [--out out/trt-bench]

``RECIPE@P1+P2`` limits a recipe to those precisions (GPTQ calibrates for minutes per compile).
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.tensorrt_onnx")

import argparse
import json
import time
from pathlib import Path

import lowbit
from lowbit.host import describe_cpu
from lowbit.tools.eval import evaluate_perplexity


def weight_bytes(onnx_path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    out = {"int4_codes": 0, "scales": 0, "fold": 0}
    for init in model.graph.initializer:
        if init.name.endswith("_trt_codes"):
            out["int4_codes"] += len(init.raw_data)
        elif init.name.endswith("_trt_scales"):
            out["scales"] += numpy_helper.to_array(init).nbytes
        elif init.name.endswith("_trt_fold"):
            out["fold"] += numpy_helper.to_array(init).nbytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="rtn-w4g64-sym,rtn-w4g64,zq-w8a8,gptq-w4g128@float16")
    ap.add_argument("--precisions", default="float32,float16")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="out/trt-bench")
    a = ap.parse_args()
    print(f"# CPU: {describe_cpu()}")
    rows = []
    for item in a.recipes.split(","):
        recipe, _, only = item.partition("@")          # "gptq-w4g128@float16": that precision only
        for precision in (only.split("+") if only else a.precisions.split(",")):
            out = Path(a.out) / f"{recipe}-{precision}"
            t0 = time.perf_counter()
            if not (out / "manifest.json").is_file():
                lowbit.compile("demo", recipe, out=out, target="tensorrt", quiet=True, trt_precision=precision)
            compile_s = time.perf_counter() - t0
            info = json.loads((out / "manifest.json").read_text())["tensorrt"]
            ppl = {}
            for backend, kernels in (("torch", "reference"), ("ort", "auto")):
                t0 = time.perf_counter()
                r = evaluate_perplexity(str(out), "demo", seq_len=a.seq_len, max_windows=a.windows,
                                        show_progress=False, backend=backend, kernels=kernels)
                ppl[backend] = (r["ppl"], time.perf_counter() - t0)
            b = weight_bytes(out / "tensorrt" / info["file"])
            row = {"recipe": recipe, "precision": precision, "ppl_torch": ppl["torch"][0], "ppl_trt_onnx": ppl["ort"][0],
                   "rel": ppl["ort"][0] / ppl["torch"][0] - 1, "compile_s": round(compile_s, 1),
                   "eval_s_torch": round(ppl["torch"][1], 1), "eval_s_ort": round(ppl["ort"][1], 1),
                   "plugins": info["plugins"], "int4_weights": info["int4_weights"], **b}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{a.windows} windows x {a.seq_len} tokens of eval.txt\n")
    print("| recipe | precision | ppl torch (fp32, reference kernels) | ppl TensorRT ONNX in ORT | difference | "
          "plugins | INT4 code MiB | fold MiB (fold / codes) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        plugins = ", ".join(f"{k} x{v}" for k, v in r["plugins"].items()) or "none"
        share = f"{r['fold'] / r['int4_codes']:.1%}" if r["int4_codes"] else "-"
        print(f"| {r['recipe']} | {r['precision']} | {r['ppl_torch']:.4f} | {r['ppl_trt_onnx']:.4f} | "
              f"{r['rel']:+.3%} | {plugins} | {r['int4_codes'] / 2**20:.2f} | {r['fold'] / 2**20:.2f} ({share}) |")


if __name__ == "__main__":
    main()
