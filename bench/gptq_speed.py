"""GPTQ compile time on a Llama-1B-shaped random-weight model (GPU when present, else CPU).

    python -m bench.gptq_speed                         # 128 x 2048 calibration tokens, w4g128, act-order
    python -m bench.gptq_speed --layers 2 --samples 8  # a quick smoke run

Random weights and random token ids: this measures speed (calibration forward, Hessians, the GPTQ
solves), not accuracy. Prints per-stage times, the per-layer mean and the peak activation memory.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.gptq_speed")

import argparse
import time

import torch

from lowbit.cli import run_script


def main() -> int:
    import transformers as tf

    from lowbit.frontend.load import LoadedModel
    from lowbit.frontend.trace import trace
    from lowbit.passes.recipe import load_recipe
    from lowbit.passes.gptq import gptq_pass

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--recipe", default="gptq-w4g128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk", type=int, default=8)
    a = ap.parse_args()
    # Llama-3.2-1B shapes (vocabulary cut to 32000: the embedding is not quantized and only costs memory).
    cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=a.layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=max(2048, a.seq_len),
                         tie_word_embeddings=True)
    t0 = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    graph = trace(LoadedModel(model, None, cfg, None, "causal-lm"))
    t_trace = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    info = gptq_pass(graph, load_recipe(a.recipe), calib_ids=ids, device=a.device, chunk=a.chunk)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_gptq = time.perf_counter() - t0
    solve = sum(s["seconds"] for s in info["layer_stats"].values())
    n = len(info["layer_stats"])
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'CPU'})")
    print(f"model: Llama-1B shape, {a.layers} layers, {n} quantized linears; calibration {a.samples} x {a.seq_len} tokens")
    print(f"| stage | seconds |\n|---|---|\n| build + trace | {t_trace:.1f} |\n| GPTQ pass total | {t_gptq:.1f} |")
    print(f"| of which GPTQ solves | {solve:.1f} ({solve / n * 1000:.0f} ms per layer) |")
    print(f"| of which calibration forward + Hessians | {t_gptq - solve:.1f} |")
    print(f"peak activation frontier {info['peak_activation_bytes'] / 2**30:.2f} GiB"
          + (f", CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if a.device.startswith("cuda") else ""))
    return 0


if __name__ == "__main__":
    run_script(main, "gptq_speed")
