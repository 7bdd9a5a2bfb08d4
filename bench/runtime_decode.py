"""The torch runtime's shipped graph against transformers' eager model, on CPU, measured in one run.

Compiles the demo LM with ``--recipe`` (default ``fp``, FP32; reused when already there), then times a
prefill of ``--prompt-len`` real tokens and ``--new-tokens`` greedy cached decode steps, batch ``--batch``,
through (a) ``lowbit.load`` (the artifact's program run by ``TorchRunner``) and (b) the source model in
transformers (sdpa attention, ``DynamicCache``: what lowbit's runtime ran before it shipped the graph;
quantized recipes get their layers swapped in as lowbit modules from the same artifact tensors). The two
take turns within each of ``--reps`` repetitions; medians. Also checks both give the same greedy tokens::

    python -m bench.runtime_decode                      # fp, batch 1, 128-token prompt
    python -m bench.runtime_decode --recipe rtn-w4g64 --reps 5
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.runtime_decode")

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import run_script
from lowbit.format.artifact import is_artifact
from lowbit.frontend.load import load_model
from lowbit.frontend.trace import cache_kwarg
from lowbit.host import describe_cpu
from lowbit.format.program import mask_positions
from lowbit.metrics import read_text


def transformers_model(art: Path):
    """The demo model in transformers, with the artifact's quantized layers as lowbit modules."""
    from lowbit.frontend.hf_modules import quant_module, swap_module

    model = load_model("demo").model
    layers = json.loads((art / "graph.json").read_text())["layers"]
    tensors = load_file(str(art / "weights.safetensors"))
    for name, spec in layers.items():
        mod = quant_module(name, spec, torch.float32)
        for key in ("qweight", "scales", "zeros", "bias"):
            if f"{name}.{key}" in tensors:
                setattr(mod, key, tensors[f"{name}.{key}"])
        swap_module(model, name, mod)
    return model.eval()


@torch.inference_mode()
def time_greedy(step, cache, ids, new_tokens):
    """(prefill seconds, median decode-step seconds, greedy tokens) with ``step(ids, mask, positions, cache)
    -> (logits, cache)``."""
    mask = torch.ones_like(ids)
    pos = mask_positions(mask)
    t0 = time.perf_counter()
    logits, cache = step(ids, mask, pos, cache)
    prefill, steps, out = time.perf_counter() - t0, [], []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        t0 = time.perf_counter()
        logits, cache = step(nxt, mask, pos, cache)
        steps.append(time.perf_counter() - t0)
    return prefill, statistics.median(steps), torch.cat(out, 1)


def transformers_step(model):
    kw = cache_kwarg(model)

    def step(ids, mask, pos, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}).logits, cache
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fp")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="out/runtime-decode")
    a = ap.parse_args()
    art = Path(a.out) / a.recipe
    if not is_artifact(art):
        lowbit.compile("demo", a.recipe, out=art, force=True, quiet=True)
    eng = lowbit.load(art, backend="torch")
    model = transformers_model(art)
    text_ids = eng.tokenizer(read_text("demo", "eval")[:20000], return_tensors="pt")["input_ids"][0]
    ids = torch.stack([text_ids[i * a.prompt_len:(i + 1) * a.prompt_len] for i in range(a.batch)])
    runs = {"lowbit graph": [], "transformers eager": []}
    from transformers import DynamicCache

    for _ in range(a.reps):
        runs["lowbit graph"].append(time_greedy(eng.runner.step, eng.runner.start(a.batch), ids, a.new_tokens))
        runs["transformers eager"].append(time_greedy(transformers_step(model), DynamicCache(config=model.config),
                                                      ids, a.new_tokens))
    same = torch.equal(runs["lowbit graph"][0][2], runs["transformers eager"][0][2])
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"demo LM, recipe {a.recipe}, batch {a.batch}, prompt {a.prompt_len} tokens, {a.new_tokens} decode "
          f"steps, median of {a.reps} interleaved runs; same greedy tokens: {same}\n")
    print("| runtime | prefill ms | decode ms/step | decode vs transformers |")
    print("|---|---|---|---|")
    base = statistics.median(r[1] for r in runs["transformers eager"])
    for name, rs in runs.items():
        pre, dec = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        print(f"| {name} | {pre * 1e3:.1f} | {dec * 1e3:.2f} | {base / dec:.2f}x |")
    return 0 if same else 1


if __name__ == "__main__":
    run_script(main, "bench/runtime_decode.py")
