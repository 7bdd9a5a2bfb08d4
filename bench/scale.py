"""Compiling models at the sizes users deploy: random-weight Llama checkpoints at real models' shapes, built once on
disk as the hub ships them (bfloat16, sharded safetensors with an index), then compiled with ``lowbit compile`` in
a fresh process each, measuring wall and CPU time, peak resident memory (the child's ``ru_maxrss``), the
compile's own phase times (the manifest), the artifact's size and its bytes per parameter.

    python -m bench.scale build --shape tinyllama-1.1b            # writes ~/.cache/lowbit/scale/tinyllama-1.1b
    python -m bench.scale compile --shape tinyllama-1.1b --recipe rtn-w4g128 --target torch [--target onnx]
    python -m bench.scale torchrun --model demo --processes 2     # GPTQ calibration: 1 process vs torchrun

Memory and time do not depend on the weights' values, so random weights measure what a real checkpoint of the same
shapes costs. Building never holds more than one shard (<= 5 GB, as the hub's) in memory. The ``predicted`` column is
the estimate of docs/big-models.md's formula for the streaming compile (``predicted_peak_bytes``).
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.scale")

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings, rope theta)
SHAPES = {
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False, 10000.0),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True, 500000.0),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False, 500000.0),
}
SHARD_BYTES = 5 * 10**9
CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "scale"


def config(shape: str):
    import transformers as tf

    hidden, inter, layers, heads, kv, vocab, tied, theta = SHAPES[shape]
    return tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                          tie_word_embeddings=tied, rope_theta=theta, max_position_embeddings=4096,
                          bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def parameter_shapes(cfg) -> list[tuple[str, tuple]]:
    """(name, shape) of every stored tensor, from a model built on the meta device (no memory)."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    tied = cfg.tie_word_embeddings
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")]


def build(shape: str, folder: Path) -> Path:
    """The checkpoint of ``shape`` in ``folder``: config.json, model-0000i-of-0000n.safetensors, the index."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        add_tokenizer(folder)
        return folder
    cfg = config(shape)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(cfg)
    groups, size = [[]], 0
    for name, dims in shapes:
        nbytes = 2 * int(torch.Size(dims).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, dims in group:
            if name.endswith("norm.weight"):
                t = torch.ones(dims, dtype=torch.bfloat16)
            else:
                t = torch.empty(dims, dtype=torch.bfloat16)
                for row in range(0, dims[0], 4096):             # bounded float32 scratch per tensor
                    t[row:row + 4096] = torch.randn((min(4096, dims[0] - row), *dims[1:]), generator=gen) * 0.02
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        print(f"  {file}: {len(tensors)} tensors", flush=True)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    add_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def add_tokenizer(folder: Path, vocab: int = 4096) -> None:
    """A byte-level BPE tokenizer trained on the demo's calibration text (ids below every shape's vocabulary), so
    GPTQ can calibrate and ``lowbit run`` can generate: the weights are random, the text only has to tokenize."""
    if (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.demo.assets import ensure_assets

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(ensure_assets()["calib"])], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def parameters(shape: str) -> int:
    import math

    return sum(math.prod(d) for _, d in parameter_shapes(config(shape)))


def block_bytes(shape: str) -> int:
    """One decoder block's matmul weights in float32: what a compile holding one block at a time keeps in the
    compute dtype (its quantized output and the activations aside)."""
    hidden, inter, _, heads, kv, _, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    return 4 * (hidden * hidden * 2 + 2 * hidden * kv * head_dim + 3 * hidden * inter)


def predicted_peak_bytes(shape: str, recipe: str, extra: list[str]) -> int:
    """The streaming compile's peak RSS by the formula of docs/big-models.md: 0.5 GiB (interpreter, torch,
    transformers, the weightless trace) + the largest of: a vocabulary table in float32 (read for the check runs)
    + the artifact's shard buffer; one block's float32 weights + three float32 copies of its largest matmul weight
    (the quantizer's dequantized weight and error, the check runs' dequantized weight) + the shard buffer (+ the
    table when the head is tied to it, which keeps it from the prologue to the epilogue); for a calibrated recipe, one
    block's float32 weights + the activations that cross from one quantized matmul to the next for every
    calibration token (2 hidden-size and 1 intermediate-size values) + one sample chunk's intermediate values (3
    intermediate-size values, or two heads x sequence attention score rows, per token) + the largest Hessian and
    its factor."""
    from lowbit.compiler.pipeline import CalibrationArgs

    hidden, inter, _, heads, _, vocab, tied, _ = SHAPES[shape]
    base, shard = 2**29, 2**29
    flags = dict(zip(extra[::2], extra[1::2]))
    seq_len = int(flags.get("--calib-seq-len", 512))
    tokens = int(flags.get("--calib-samples", 128)) * seq_len
    chunk_tokens = CalibrationArgs.chunk * seq_len
    table = 4 * vocab * hidden
    # A table tied to the head is read in the prologue and kept for the head's check runs: every block beside it.
    temporaries = 3 * 4 * hidden * inter
    need = max(table + shard, block_bytes(shape) + temporaries + shard + (table if tied else 0))
    if recipe.startswith("gptq"):
        need = max(need, block_bytes(shape) + 4 * tokens * (2 * hidden + inter)
                   + 4 * chunk_tokens * max(3 * inter, 2 * heads * seq_len) + 2 * 4 * inter * inter)
    return base + need


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` to the end; its wall time, CPU time and peak RSS (the child's own maxrss, in KiB on Linux)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {(err.strip().splitlines() or ['?'])[-1]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "stdout": out}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compile_row(shape: str, recipe: str, target: str, out: Path, extra: list[str]) -> dict:
    src = build(shape, CACHE / shape)
    cmd = [sys.executable, "-m", "lowbit.cli", "compile", str(src), "-r", recipe, "-t", target, "-o", str(out),
           "--force", "-q", *extra]
    row = measure(cmd)
    manifest = json.loads((out / "manifest.json").read_text())
    n = parameters(shape)
    row.update(shape=shape, recipe=recipe, target=target, params_b=round(n / 1e9, 2),
               checkpoint_gib=round(folder_bytes(src) / 2**30, 2), artifact_gib=round(folder_bytes(out) / 2**30, 2),
               bytes_per_param=round(folder_bytes(out) / n, 3), phases=manifest.get("timings", {}),
               block_f32_gib=round(block_bytes(shape) / 2**30, 2),
               predicted_gib=round(predicted_peak_bytes(shape, recipe, extra) / 2**30, 2))
    return row


def torchrun_rows(model: str, recipe: str, samples: int, seq_len: int, processes: int, out: Path) -> list[dict]:
    """The same GPTQ compile in one process and under ``torchrun --nproc-per-node processes``, one after the
    other; wall/CPU time (all processes), peak RSS (the largest process) and whether the codes are identical."""
    import torch
    from safetensors.torch import load_file

    src = model if model == "demo" else str(build(model, CACHE / model))
    flags = ["compile", src, "-r", recipe, "--calib-samples", str(samples), "--calib-seq-len", str(seq_len), "-q",
             "--force"]
    rows = []
    for n in (1, processes):
        start = [sys.executable, "-m", "lowbit"] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "lowbit"]
        row = measure(start + flags + ["-o", str(out / f"{n}")])
        row.update(processes=n, artifact=out / f"{n}")
        rows.append(row)
    a, b = (load_file(str(r["artifact"] / "weights.safetensors")) for r in rows)
    same = sum(int(torch.equal(a[k], b[k])) for k in a)
    for r in rows:
        r["tensors_identical"] = f"{same}/{len(a)}"
    return rows


def main() -> int:
    from lowbit.host import describe_cpu

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-weight checkpoint at a real model's shapes")
    b.add_argument("--shape", choices=SHAPES, required=True)
    c = sub.add_parser("compile", help="compile checkpoints in fresh processes, measuring time and memory")
    c.add_argument("--shape", choices=SHAPES, action="append", required=True)
    c.add_argument("--recipe", action="append", default=None, help="repeatable (default rtn-w4g128)")
    c.add_argument("--target", action="append", default=None, help="repeatable (default torch)")
    c.add_argument("--out", default=str(CACHE / "out"), help="artifact folder root (default %(default)s)")
    c.add_argument("--json", default=None, help="also write the rows to this JSON file")
    c.add_argument("extra", nargs="*", help="more lowbit compile flags, after --")
    t = sub.add_parser("torchrun", help="GPTQ calibration in one process against torchrun with N processes")
    t.add_argument("--model", default="demo", help="'demo' or a --shape name (default demo)")
    t.add_argument("--recipe", default="gptq-w4g128")
    t.add_argument("--samples", type=int, default=128)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--processes", type=int, default=2)
    t.add_argument("--out", default=str(CACHE / "out" / "torchrun"))
    a = p.parse_args()
    if a.cmd == "torchrun":
        print(f"CPU: {describe_cpu()}; {os.cpu_count()} cores")
        rows = torchrun_rows(a.model, a.recipe, a.samples, a.seq_len, a.processes, Path(a.out))
        print(f"{a.model}, {a.recipe}, {a.samples} x {a.seq_len} calibration tokens\n"
              "| processes | wall s | CPU s (all) | peak RSS GiB (largest) | speedup | "
              "tensors identical to 1 process |\n"
              "|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['processes']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']} | "
                  f"{rows[0]['wall_s'] / r['wall_s']:.2f}x | {r['tensors_identical']} |")
        return 0
    if a.cmd == "build":
        t0 = time.perf_counter()
        folder = build(a.shape, CACHE / a.shape)
        print(f"{folder}: {folder_bytes(folder) / 2**30:.2f} GiB, {parameters(a.shape) / 1e9:.2f}B parameters, "
              f"{time.perf_counter() - t0:.0f} s")
        return 0
    print(f"CPU: {describe_cpu()}")
    rows = []
    print("| shape | recipe | target | params | wall s | CPU s | peak RSS GiB | predicted GiB | block f32 GiB | "
          "artifact GiB | bytes/param | phases (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shape:
        for recipe in a.recipe or ["rtn-w4g128"]:
            for target in a.target or ["torch"]:
                r = compile_row(shape, recipe, target, Path(a.out) / f"{shape}-{recipe}-{target}", a.extra)
                rows.append(r)
                phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items() if k != "total")
                print(f"| {shape} | {recipe} | {target} | {r['params_b']}B | {r['wall_s']} | {r['cpu_s']} | "
                      f"{r['peak_rss_gib']} | {r['predicted_gib']} | {r['block_f32_gib']} | {r['artifact_gib']} | "
                      f"{r['bytes_per_param']} | "
                      f"{phases} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "stdout"} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
