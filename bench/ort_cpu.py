"""ONNX Runtime on CPU: FP32 vs INT4 (MatMulNBits) vs W8A8 ONNX of the demo model, all exported by lowbit.

For each variant: compile the demo model with ``--target onnx`` (reused when already there), then with
the ORT backend time a prefill of ``--prompt-len`` real tokens and ``--new-tokens`` greedy decode steps
(KV cache kept in ONNX Runtime through IO binding) at each batch size, median of ``--reps`` runs, the
variants taking turns within each repetition. Prints the CPU (model and instruction-set flags), a markdown
table with the speedups over FP32 measured in the same process, the ONNX file and matmul-weight sizes, and
a parity section (ORT vs the torch backend of the same artifact: perplexity on eval.txt windows, max logit
difference, 32 greedy tokens)::

    python bench/ort_cpu.py                       # all variants, batch 1 and 4
    python bench/ort_cpu.py --variants int4 --batch 1 --reps 1
    python bench/ort_cpu.py --variants fp32,w8a8,w8a8-u8s8     # what the exact W8A8 form costs

``w8a8-u8s8`` is not a lowbit output: it is the W8A8 artifact rewritten to the uint8 x int8 form, whose
integer sums saturate on x86 CPUs without VNNI (``lowbit/plugins/onnx/integer_matmul.py``); its parity row
shows how wrong that is on the CPU at hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lowbit
from lowbit.demo.assets import ensure_assets
from lowbit.cli import run_script
from lowbit.format.artifact import is_artifact, read_manifest, sha256_file
from lowbit.compiler.recipe import Override, Recipe
from lowbit.device import describe_cpu
from lowbit.eval import evaluate_perplexity, read_text

# At batch 1 a decode step reads every weight once; with 4-bit blocks the float lm_head (tied to the
# embedding, 108 MiB in FP32) is two thirds of what is left, so one variant also quantizes it, to INT8.
HEAD8 = Recipe("rtn-w4g64-head8", "rtn", 4, 64, quantize_lm_head=True,
               overrides=[Override("lm_head", bits=8, group_size=64)])
# name -> (recipe, MatMulNBits accuracy_level)
VARIANTS = {"fp32": ("fp", 0), "int4": ("rtn-w4g64", 0), "int4-acc4": ("rtn-w4g64", 4),
            "int4-head8": (HEAD8, 0), "int4-head8-acc4": (HEAD8, 4), "w8a8": ("zq-w8a8", 0),
            "w8a8-u8s8": ("zq-w8a8", 0)}
# Not a lowbit output: the w8a8 artifact with its uint8 x uint8 MatMulIntegers rewritten to the uint8 x int8
# form that saturates on x86 without VNNI, to measure in the same run what the exact form costs.
SATURATING = "w8a8-u8s8"
PROMPTS = ["The theory of relativity was developed by", "The capital city of France is"]


def saturating_copy(src: Path, dst: Path) -> Path:
    """``src`` (a W8A8 ONNX artifact) with every uint8 x uint8 MatMulInteger turned into uint8 x int8."""
    import onnx
    from onnx import numpy_helper

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "onnx" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and len(node.input) == 4:        # b_zero_point 128: w + 128
            w = inits[node.input[1]]
            signed = (numpy_helper.to_array(w).astype(np.int16) - 128).astype(np.int8)
            w.CopyFrom(numpy_helper.from_array(signed, w.name))
            del node.input[3]
            n += 1
    onnx.save(model, str(dst / "onnx" / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["onnx"]["integer_matmuls"] = {"u8s8-8bit (saturates without VNNI)": n}
    manifest["files"]["onnx/model.onnx"] = sha256_file(dst / "onnx" / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


def artifact_for(variant: str, out_dir: Path, rebuild: bool) -> Path:
    if variant == SATURATING:
        return saturating_copy(artifact_for("w8a8", out_dir, rebuild), out_dir / variant)
    recipe, level = VARIANTS[variant]
    out = out_dir / variant
    if not rebuild and is_artifact(out):
        m = read_manifest(out, verify=False)
        name = recipe.name if isinstance(recipe, Recipe) else recipe
        if m.get("target") == "onnx" and m["recipe"]["name"] == name and m["onnx"]["accuracy_level"] == level:
            return out
    return lowbit.compile("demo", recipe, out=out, target="onnx", force=True, onnx_accuracy_level=level)


def time_generation(eng, ids: torch.Tensor, new_tokens: int) -> dict:
    """One run: prefill seconds and the median decode seconds per step (greedy, no early stop)."""
    runner = eng.runner
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1)
    t0 = time.perf_counter()
    logits, cache = runner.step(ids, mask, pos, runner.start(ids.shape[0]))
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        t0 = time.perf_counter()
        logits, cache = runner.step(nxt, mask, pos, cache)
        steps.append(time.perf_counter() - t0)
    return {"prefill_s": prefill, "decode_s": statistics.median(steps)}


def parity(art: Path, eval_text: str, windows: int) -> dict:
    """ORT vs torch backend of one artifact: perplexity, max logit difference, greedy tokens."""
    ppl = {b: evaluate_perplexity(str(art), eval_text, seq_len=512, max_windows=windows, show_progress=False,
                                  backend=b)["ppl"] for b in ("torch", "ort")}
    t_eng, o_eng = lowbit.load(art, backend="torch"), lowbit.load(art, backend="ort")
    ids = t_eng.tokenizer(read_text(eval_text)[:4000], return_tensors="pt")["input_ids"][:, :256]
    lt, lo = t_eng.forward(ids), o_eng.forward(ids)
    # The same torch program with 1e-6 relative noise on its float tensors: how far float noise alone moves
    # the logits, the yardstick for the ORT difference (large for per-token INT8 activations).
    g = torch.Generator().manual_seed(0)
    noisy = lowbit.load(art, backend="torch")
    with torch.no_grad():
        for t in noisy.runner.gm.buffers():
            if t.dtype == torch.float32:
                t.mul_(1 + 1e-6 * torch.randn(t.shape, generator=g))
    ln = noisy.forward(ids)
    gen_t = t_eng.generate(PROMPTS, max_new_tokens=32, stop_at_eos=False)
    gen_o = o_eng.generate(PROMPTS, max_new_tokens=32, stop_at_eos=False)
    return {"ppl_torch": ppl["torch"], "ppl_ort": ppl["ort"], "ppl_rel_diff": abs(ppl["ort"] / ppl["torch"] - 1),
            "logits_max_rel_diff": float((lo - lt).abs().max() / lt.abs().max()),
            "noise_max_rel_diff": float((ln - lt).abs().max() / lt.abs().max()),
            "greedy32_identical": gen_t == gen_o, "sample": gen_o[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", default="1,4", help="comma list of batch sizes (default 1,4)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default, all cores)")
    ap.add_argument("--parity-windows", type=int, default=20, help="eval.txt windows for the parity check (0: skip)")
    ap.add_argument("--out-dir", default="out/ort-cpu")
    ap.add_argument("--rebuild", action="store_true", help="recompile artifacts even when present")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise lowbit.LowbitError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batch.split(",")]
    paths = ensure_assets()
    arts, engines, manifests = {}, {}, {}
    for v in variants:
        arts[v] = artifact_for(v, Path(args.out_dir), args.rebuild)
        manifests[v] = read_manifest(arts[v], verify=False)
        engines[v] = lowbit.load(arts[v], backend="ort", threads=args.threads)
    first = engines[variants[0]]
    text_ids = first.tokenizer(read_text(paths["eval"])[:200000], return_tensors="pt")["input_ids"][0]
    rows = []
    for b in batches:
        ids = torch.stack([text_ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(b)])
        # Variants take turns within each repetition, so a change in the machine's load hits them alike.
        runs = {v: [] for v in variants}
        for v in variants:
            time_generation(engines[v], ids, 2)                    # untimed: first-run set-up
        for _ in range(args.reps):
            for v in variants:
                runs[v].append(time_generation(engines[v], ids, args.new_tokens))
        for v in variants:
            m, mm = manifests[v], manifests[v]["onnx"]["matmul_weight_bytes"]
            t = {k: statistics.median(r[k] for r in runs[v]) for k in ("prefill_s", "decode_s")}
            rows.append({"variant": v, "recipe": m["recipe"]["name"], "batch": b, "onnx_mib": m["onnx"]["bytes"] / 2**20,
                         "quantized_matmul_mib": sum(val for k, val in mm.items() if k != "MatMul") / 2**20,
                         "float_matmul_mib": mm.get("MatMul", 0) / 2**20, **t,
                         "tokens_per_s": b / t["decode_s"]})
    rows.sort(key=lambda r: (variants.index(r["variant"]), r["batch"]))
    checks = {v: parity(arts[v], paths["eval"], args.parity_windows) for v in variants} if args.parity_windows else {}
    base = {r["batch"]: r for r in rows if r["variant"] == "fp32"}
    print(f"\nSmolLM2-135M, ONNX Runtime {ort.__version__} CPU ({torch.get_num_threads()} torch threads visible), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.reps}\nCPU: {describe_cpu()}\n")
    print("| variant | batch | ONNX file | matmul weights (quantized + float) | prefill ms | decode ms/token | "
          "tokens/s | decode vs FP32 | prefill vs FP32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp = base.get(r["batch"])
        sp = f"{fp['decode_s'] / r['decode_s']:.2f}x" if fp else "-"
        pp = f"{fp['prefill_s'] / r['prefill_s']:.2f}x" if fp else "-"
        print(f"| {r['variant']} ({r['recipe']}) | {r['batch']} | {r['onnx_mib']:.1f} MiB | "
              f"{r['quantized_matmul_mib']:.1f} + {r['float_matmul_mib']:.1f} MiB | {r['prefill_s'] * 1e3:.1f} | "
              f"{r['decode_s'] * 1e3:.2f} | {r['tokens_per_s']:.1f} | {sp} | {pp} |")
    fp_rows = [r for r in rows if r["variant"] == "fp32"]
    if fp_rows:
        fp_block = fp_rows[0]["float_matmul_mib"]
        for r in rows:
            if r["variant"] != "fp32" and r["batch"] == batches[0] and r["quantized_matmul_mib"]:
                same_layers_fp = fp_block - r["float_matmul_mib"]
                print(f"\n{r['variant']}: quantized matmul weights {r['quantized_matmul_mib']:.1f} MiB vs "
                      f"{same_layers_fp:.1f} MiB for the same matmuls in the FP32 ONNX "
                      f"({same_layers_fp / r['quantized_matmul_mib']:.2f}x smaller)")
    if checks:
        print(f"\nParity, ORT vs torch backend of the same artifact ({args.parity_windows} eval.txt windows of 512; "
              "-acc4 variants are not meant to match: there ONNX Runtime quantizes activations inside "
              "MatMulNBits, which the torch backend does not):\n")
        print("| variant | ppl torch | ppl ORT | ppl diff | max logit diff (rel) | torch vs torch, 1e-6 input noise | "
              "32 greedy tokens identical |")
        print("|---|---|---|---|---|---|---|")
        for v, c in checks.items():
            print(f"| {v} | {c['ppl_torch']:.3f} | {c['ppl_ort']:.3f} | {c['ppl_rel_diff'] * 100:.4f}% | "
                  f"{c['logits_max_rel_diff']:.2e} | {c['noise_max_rel_diff']:.2e} | "
                  f"{'yes' if c['greedy32_identical'] else 'NO'} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "parity": checks, "args": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main, "ort_cpu.py")
