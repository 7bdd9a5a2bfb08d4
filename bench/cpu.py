"""The demo LM on CPU, every way lowbit runs it and the onnxruntime-genai builder's model, timed in one run.

Variants (``--variants``, comma list):

- ``torch-*``: the torch backend (the shipped program; ``kernels="auto"``, the CPU kernels of
  ``lowbit/kernels/cpu.py``) on the same artifacts as the ORT rows;
- ``ort-*``: lowbit's ONNX (``--target onnx``) in ONNX Runtime, at MatMulNBits accuracy level 0 or 4 (``-acc4``),
  with a float, INT8 (``-head8``: groups of 64; ``-head8c``: per channel) or INT4 (``-head4``) lm_head, or the
  tied embedding and lm_head as one INT4 table (``-tied4``, the builder's layout; ``int4sym`` / ``gptqsym``:
  symmetric, the builder's default, which leaves MatMulNBits its zero points out); ``ort-gptq-*``: GPTQ on the
  layers (128 calib.txt samples of 512);
- ``genai`` / ``genai-session``: ``python -m onnxruntime_genai.models.builder`` (int4, block 64, accuracy level 4:
  its CPU settings) on the same model folder, run through ``onnxruntime_genai`` and through a plain session.
  Needs ``pip install onnxruntime-genai`` (the ``bench`` extra); skipped with the reason without it.

Prefill of ``--prompt-len`` real tokens, then ``--new-tokens`` greedy steps, at each ``--batch``; the median of
``--reps`` runs, the variants taking turns within each repetition. Prints the CPU and its flags, ms/token,
prefill ms, tokens/s, the ratios against torch FP32 and against the builder's model in onnxruntime_genai, the
files' sizes, and perplexity on ``eval.txt`` windows (``--ppl-windows`` of 512 tokens, from each variant's own
logits, the builder's included) plus, for the torch rows, on the decode path (one cached step per token,
``--decode-ppl-windows`` of 128: what the bfloat16 kernels compute)::

    python -m bench.cpu                                   # everything, batch 1 and 4
    python -m bench.cpu --variants torch-fp32,torch-int4 --batch 1 --reps 5 --ppl-windows 0
    python -m bench.cpu --variants ort-fp32,ort-w8a8,ort-w8a8-u8s8    # what the exact W8A8 form costs

``ort-w8a8-u8s8`` is not a lowbit output: the W8A8 artifact rewritten to the uint8 x int8 form, whose integer sums
saturate on x86 CPUs without VNNI (``lowbit/lowering/onnx/integer_matmul.py``); its perplexity shows how wrong
that is on the CPU at hand.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.cpu")

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnxruntime as ort
import torch

import lowbit
from lowbit.cli import run_script
from lowbit.passes.recipe import Recipe
from lowbit.passes.settings import Override, Scheme
from lowbit.demo.assets import ensure_assets
from lowbit.host import describe_cpu
from lowbit.metrics import perplexity as eval_perplexity, read_text
from lowbit.format.artifact import is_artifact, read_manifest, sha256_file
from lowbit.runtime.engine import load_tokenizer
from lowbit.runtime.ort_session import KVBuffers

# The lm_head is tied to the embedding (108 MiB in FP32): at batch 1 it is two thirds of what a 4-bit decode step
# reads, so variants quantize it too, to INT8 or to INT4 (the builder's setting).
HEAD8 = Recipe("rtn-w4g64-head8", "rtn", Scheme(4, 64, quantize_lm_head=True,
                                                 overrides=(Override("lm_head", bits=8, group_size=64),)))
HEAD4 = Recipe("rtn-w4g64-head4", "rtn", Scheme(4, 64, quantize_lm_head=True))
# The builder's layout: the tied embedding and lm_head as one INT4 g64 table (GatherBlockQuantized reads the
# head's MatMulNBits initializers).
TIED4 = Recipe("rtn-w4g64-tied4", "rtn", Scheme(4, 64, quantize_lm_head=True, quantize_embeddings=True))
# GPTQ (act-order, static groups) on the layers, the same tied INT4 table: lower perplexity at the builder's size.
GPTQ_TIED4 = Recipe("gptq-w4g64-tied4", "gptq", Scheme(4, 64, quantize_lm_head=True, quantize_embeddings=True))
# Symmetric, as the builder quantizes by default: MatMulNBits gets no zero points and runs its symmetric kernels.
TIED4_SYM = Recipe("rtn-w4g64-sym-tied4", "rtn", Scheme(4, 64, sym=True, quantize_lm_head=True,
                                                         quantize_embeddings=True))
GPTQ_TIED4_SYM = Recipe("gptq-w4g64-sym-tied4", "gptq", Scheme(4, 64, sym=True, quantize_lm_head=True,
                                                                quantize_embeddings=True))
# llama.cpp's Q4_0 layout: symmetric INT4 in blocks of 32, the (tied) head in INT8 as llama.cpp keeps it (Q8_0); the
# embedding stays float (a gather reads one row per token).
Q4_0_HEAD8 = Recipe("rtn-w4g32-sym-head8", "rtn", Scheme(4, 32, sym=True, quantize_lm_head=True,
                                                          overrides=(Override("lm_head", bits=8, group_size=32),)))
GPTQ_Q4_0_HEAD8 = Recipe("gptq-w4g32-sym-head8", "gptq", Scheme(4, 32, sym=True, quantize_lm_head=True,
                                                                 overrides=(Override("lm_head", bits=8,
                                                                                     group_size=32),)))
# INT8 per channel: the torch backend's int8pack kernel takes it at decode (a grouped INT8 head is dequantized).
HEAD8C = Recipe("rtn-w4g64-head8c", "rtn", Scheme(4, 64, quantize_lm_head=True,
                                                   overrides=(Override("lm_head", bits=8, group_size=0),)))


@dataclass(frozen=True)
class Variant:
    recipe: Union[str, Recipe, None]     # None: the builder's model
    level: int                           # MatMulNBits accuracy level of the ONNX export
    backend: str                         # torch | ort | genai | genai-session


VARIANTS = {
    "torch-fp32": Variant("fp", 0, "torch"),
    "torch-int4": Variant("rtn-w4g64", 0, "torch"),
    "torch-int4-head8c": Variant(HEAD8C, 0, "torch"),
    "torch-int4-head4": Variant(HEAD4, 0, "torch"),
    "ort-fp32": Variant("fp", 0, "ort"),
    "ort-int4": Variant("rtn-w4g64", 0, "ort"),
    "ort-int4-acc4": Variant("rtn-w4g64", 4, "ort"),
    "ort-int4-head8-acc4": Variant(HEAD8, 4, "ort"),
    "ort-int4-head4-acc4": Variant(HEAD4, 4, "ort"),
    "ort-int4-tied4-acc4": Variant(TIED4, 4, "ort"),
    "ort-gptq-tied4-acc4": Variant(GPTQ_TIED4, 4, "ort"),
    "ort-int4sym-tied4-acc4": Variant(TIED4_SYM, 4, "ort"),
    "ort-gptqsym-tied4-acc4": Variant(GPTQ_TIED4_SYM, 4, "ort"),
    "ort-q4_0-head8-acc4": Variant(Q4_0_HEAD8, 4, "ort"),
    "ort-gptq-q4_0-head8-acc4": Variant(GPTQ_Q4_0_HEAD8, 4, "ort"),
    "ort-w8a8": Variant("zq-w8a8", 0, "ort"),
    "ort-w8a8-u8s8": Variant("zq-w8a8", 0, "ort"),
    "genai": Variant(None, 4, "genai"),
    "genai-session": Variant(None, 4, "genai-session"),
}
SATURATING = "ort-w8a8-u8s8"
BASELINE, PEER = "torch-fp32", "genai"


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


def artifact_for(name: str, out_dir: Path, rebuild: bool) -> Path:
    """The ``--target onnx`` artifact of a variant's recipe and level (the torch rows run its program)."""
    v = VARIANTS[name]
    if name == SATURATING:
        return saturating_copy(artifact_for("ort-w8a8", out_dir, rebuild), out_dir / name)
    recipe = v.recipe.name if isinstance(v.recipe, Recipe) else v.recipe
    out = out_dir / f"{recipe}-acc{v.level}"
    if not rebuild and is_artifact(out):
        m = read_manifest(out, verify=False)
        if m.get("target") == "onnx" and m["recipe"]["name"] == recipe and m["onnx"]["accuracy_level"] == v.level:
            return out
    return lowbit.compile("demo", v.recipe, out=out, target="onnx", force=True, onnx_accuracy_level=v.level)


def build_genai(model_dir: str, out: Path, rebuild: bool) -> tuple[Path, float]:
    """The builder's int4 model of ``model_dir`` (block 64, accuracy level 4), and the seconds it took."""
    if not rebuild and (out / "genai_config.json").is_file():
        return out, float("nan")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model_dir, "-o", str(out),
                           "-p", "int4", "-e", "cpu", "--extra_options", "block_size=64", "accuracy_level=4"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise lowbit.LowbitError(f"the onnxruntime-genai builder failed: {proc.stderr.strip().splitlines()[-1]}")
    return out, time.perf_counter() - t0


class SessionRunner:
    """The builder's model in a plain ONNX Runtime session, with the Engine's runner interface (its attention takes
    positions from the mask, so ``position_ids`` is unused); the cache stays in ORT through IO binding."""

    def __init__(self, folder: Path, threads: int = 0):
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / cfg["filename"]), opts, providers=["CPUExecutionProvider"])
        self.layers, self.heads, self.dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        self.past = [n.name for n in self.session.get_inputs() if n.name.startswith("past_key_values")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def start(self, batch: int, capacity: int = 0) -> list:
        """Buffers of ``capacity`` positions its GroupQueryAttention writes in place (as onnxruntime_genai runs it),
        or an empty cache each step extends."""
        cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.heads, capacity, self.dim), np.float32))
                 for _ in self.past]
        return KVBuffers(cache, capacity) if capacity else cache

    def step(self, input_ids, attention_mask, position_ids, cache):
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids.numpy().astype(np.int64))
        binding.bind_cpu_input("attention_mask", attention_mask.numpy().astype(np.int64))
        for name, value in zip(self.past, cache):
            binding.bind_ortvalue_input(name, value)
        in_place = dict(zip(self.outputs[1:], cache)) if isinstance(cache, KVBuffers) else {}
        for name in self.outputs:
            if name in in_place:
                binding.bind_ortvalue_output(name, in_place[name])
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return torch.from_numpy(outs[0].numpy()), cache if in_place else outs[1:]


class GenaiTimer:
    """The builder's model through ``onnxruntime_genai`` itself: prefill = ``append_tokens``, decode = one
    ``generate_next_token`` per token."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def time(self, ids: torch.Tensor, new_tokens: int) -> dict:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=ids.shape[0])
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids.numpy().astype(np.int32))
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t0)
        return {"prefill_s": prefill, "decode_s": statistics.median(steps)}


def time_generation(runner, ids: torch.Tensor, new_tokens: int) -> dict:
    """One run through a runner: prefill seconds and the median decode seconds per step (greedy, no early stop)."""
    mask = torch.ones_like(ids)
    pos = mask.cumsum(-1) - 1
    t0 = time.perf_counter()
    cache = runner.start(ids.shape[0], ids.shape[1] + new_tokens)
    logits, cache = runner.step(ids, mask, pos, cache)
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


def perplexity(runner, windows: list[torch.Tensor], one_token_steps: bool = False) -> float:
    """``lowbit.metrics.perplexity`` over the windows through a runner: logits from whole-window prefills, or from one
    cached step per token."""
    def logits(ids):
        mask = torch.ones_like(ids)
        if not one_token_steps:
            return runner.step(ids, mask, mask.cumsum(-1) - 1, runner.start(ids.shape[0]))[0]
        cache, rows = runner.start(ids.shape[0], ids.shape[1]), []
        for t in range(ids.shape[1]):
            out, cache = runner.step(ids[:, t:t + 1], mask[:, :t + 1], torch.full((ids.shape[0], 1), t), cache)
            rows.append(out[:, -1])
        return torch.stack(rows, 1)

    return eval_perplexity(logits, torch.stack(windows), show_progress=False)["ppl"]


def file_mib(v: Variant, art: Optional[Path], genai_dir: Optional[Path]) -> float:
    if v.recipe is None:
        return sum(f.stat().st_size for f in genai_dir.glob("model.onnx*")) / 2**20
    if v.backend == "torch":
        return (art / "weights.safetensors").stat().st_size / 2**20
    return read_manifest(art, verify=False)["onnx"]["bytes"] / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", default="1,4", help="comma list of batch sizes (default 1,4)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default, all cores)")
    ap.add_argument("--ppl-windows", type=int, default=20, help="eval.txt windows of 512 for perplexity (0: skip)")
    ap.add_argument("--decode-ppl-windows", type=int, default=4,
                    help="eval.txt windows of 128 scored one cached step per token, torch rows (0: skip)")
    ap.add_argument("--out-dir", default="out/cpu-bench")
    ap.add_argument("--rebuild", action="store_true", help="recompile artifacts and the builder's model")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise lowbit.LowbitError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batch.split(",")]
    paths = ensure_assets()
    out_dir = Path(args.out_dir)
    genai_dir, build_s, skipped = None, float("nan"), {}
    if any(VARIANTS[n].recipe is None for n in names):
        try:
            import onnxruntime_genai  # noqa: F401
            genai_dir, build_s = build_genai(paths["model"], out_dir / "genai-int4", args.rebuild)
        except ImportError:
            skipped = {n: "onnxruntime-genai is not installed (pip install 'lowbit[bench]')"
                       for n in names if VARIANTS[n].recipe is None}
            names = [n for n in names if n not in skipped]
    arts, runners = {}, {}
    for n in names:
        v = VARIANTS[n]
        if v.recipe is None:
            runners[n] = GenaiTimer(genai_dir) if v.backend == "genai" else SessionRunner(genai_dir, args.threads)
        else:
            arts[n] = artifact_for(n, out_dir, args.rebuild)
            runners[n] = lowbit.load(arts[n], backend=v.backend, threads=args.threads).runner
    tok = load_tokenizer(next(iter(arts.values())) / "tokenizer" if arts else genai_dir)
    text_ids = tok(read_text(paths["eval"])[:200000], return_tensors="pt")["input_ids"][0]
    session_of = {n: (runners[n] if VARIANTS[n].backend != "genai" else SessionRunner(genai_dir)) for n in names}

    def timed(n, ids, new):
        return runners[n].time(ids, new) if VARIANTS[n].backend == "genai" else time_generation(runners[n], ids, new)

    rows = []
    for b in batches:
        ids = torch.stack([text_ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(b)])
        runs = {n: [] for n in names}
        for n in names:
            timed(n, ids, 2)                                      # untimed: first-run set-up
        for _ in range(args.reps):                                # variants take turns: load changes hit all alike
            for n in names:
                runs[n].append(timed(n, ids, args.new_tokens))
        for n in names:
            t = {k: statistics.median(r[k] for r in runs[n]) for k in ("prefill_s", "decode_s")}
            rows.append({"variant": n, "batch": b, "mib": file_mib(VARIANTS[n], arts.get(n), genai_dir), **t,
                         "tokens_per_s": b / t["decode_s"]})
    ppl = {}
    if args.ppl_windows:
        wins = [w for w in text_ids.split(512) if len(w) == 512][:args.ppl_windows]
        ppl = {n: perplexity(session_of[n], wins) for n in names}
    dppl = {}
    if args.decode_ppl_windows:
        wins = [w for w in text_ids.split(128) if len(w) == 128][:args.decode_ppl_windows]
        for n in (n for n in names if VARIANTS[n].backend == "torch"):
            dppl[n] = (perplexity(session_of[n], wins), perplexity(session_of[n], wins, one_token_steps=True))

    print(f"\nSmolLM2-135M on CPU: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of "
          f"{args.reps}; torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{ort.__version__}\nCPU: {describe_cpu()}\n")
    if genai_dir is not None:
        print(f"onnxruntime-genai builder model: {genai_dir} (built in {build_s:.1f} s; nan: reused)\n")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    print("| variant | batch | files MiB | prefill ms | decode ms/token | tokens/s | decode vs torch FP32 | "
          "prefill vs torch FP32 | decode vs genai | ppl (eval.txt) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by = {(r["variant"], r["batch"]): r for r in rows}
    for r in rows:
        base, peer = by.get((BASELINE, r["batch"])), by.get((PEER, r["batch"]))
        ratio = (lambda ref, key: f"{ref[key] / r[key]:.2f}x" if ref else "-")
        p = f"{ppl[r['variant']]:.3f}" if r["variant"] in ppl else "-"
        print(f"| {r['variant']} | {r['batch']} | {r['mib']:.1f} | {r['prefill_s'] * 1e3:.1f} | "
              f"{r['decode_s'] * 1e3:.2f} | {r['tokens_per_s']:.1f} | {ratio(base, 'decode_s')} | "
              f"{ratio(base, 'prefill_s')} | {ratio(peer, 'decode_s')} | {p} |")
    if dppl:
        print(f"\nTorch rows, {args.decode_ppl_windows} windows of 128: perplexity from one prefill per window vs "
              "one cached step per token (the CPU kernels' bfloat16 path)\n")
        print("| variant | prefill path | decode path | diff |")
        print("|---|---|---|---|")
        for n, (a, d) in dppl.items():
            print(f"| {n} | {a:.4f} | {d:.4f} | {(d / a - 1) * 100:+.3f}% |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "ppl": ppl, "decode_ppl": dppl, "cpu": describe_cpu(),
                                               "args": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main, "cpu.py")
