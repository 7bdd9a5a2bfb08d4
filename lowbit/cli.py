"""The ``lowbit`` command: compile | run | eval | profile | inspect | build-engine | recipes | assets | doctor.

User errors (LowbitError) print one line on stderr and exit 2 with no traceback; progress goes to
stderr so ``--json`` output on stdout can be piped.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_compile(a) -> int:
    from lowbit.compiler.pipeline import CalibrationArgs, compile_model

    calib = CalibrationArgs(a.calib, a.calib_samples, a.calib_seq_len, a.seed)
    out = compile_model(a.model, recipe=a.recipe, target=a.target, out=a.output, force=a.force, quiet=a.quiet,
                        calib=calib, device=a.device, resume=a.resume, eval_text=a.eval, eval_windows=a.eval_windows,
                        eval_seq_len=a.eval_seq_len, onnx_accuracy_level=a.onnx_accuracy_level,
                        onnx_fusions=not a.no_onnx_fusions, onnx_exporter=a.onnx_exporter,
                        trt_precision=a.trt_precision,
                        lkd={"steps": a.lkd_steps, "lr": a.lkd_lr, "batch": a.lkd_batch, "data": a.lkd_data,
                             "samples": a.lkd_samples, "seq_len": a.lkd_seq_len, "loss": a.lkd_loss,
                             "inputs": a.lkd_inputs})
    print(out)
    return 0


def _cmd_run(a) -> int:
    import lowbit

    # lowbit.load, not Engine.load: without torch an ONNX artifact still runs (runtime/lite.py).
    eng = lowbit.load(a.artifact, backend=a.backend, provider=a.provider, device=a.device, dtype=a.dtype,
                      kernels=a.kernels)
    texts = eng.generate(a.prompt, max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature,
                         top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    for prompt, text in zip(a.prompt, texts):
        if a.json:
            print(json.dumps({"prompt": prompt, "completion": text}))
        else:
            print(f"{prompt}{text}")
    return 0


def _cmd_eval(a) -> int:
    from lowbit.eval import evaluate_embeddings, evaluate_perplexity

    if a.embeddings:
        result = evaluate_embeddings(a.target, a.embeddings, max_sentences=a.max_sentences, show_progress=not a.quiet,
                                     backend=a.backend, provider=a.provider, device=a.device, dtype=a.dtype,
                                     kernels=a.kernels)
        print(json.dumps(result) if a.json else f"mean cosine {result['cosine_mean']:.5f} (min "
                                                 f"{result['cosine_min']:.5f}) over {result['sentences']} sentences")
        return 0

    result = evaluate_perplexity(a.target, a.text, seq_len=a.seq_len, max_windows=a.max_windows,
                                 batch_size=a.batch_size, show_progress=not a.quiet, backend=a.backend,
                                 provider=a.provider, device=a.device, dtype=a.dtype, kernels=a.kernels)
    if a.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens in {result['windows']} windows "
              f"of {result['seq_len']}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    from lowbit.errors import LowbitError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"{what} '{text}': give comma-separated integers, e.g. 1,4") from None


def _cmd_profile(a) -> int:
    from lowbit.errors import LowbitError
    from lowbit.runtime.profiler import format_table, profile

    try:
        percentiles = [float(v) for v in a.percentiles.split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"--percentiles '{a.percentiles}': give comma-separated numbers, e.g. 50,90,99") from None
    doc = profile(a.artifacts, backend=a.backend, device=a.device, batches=_int_list(a.batch, "--batch"),
                  prompt_lens=_int_list(a.prompt_len, "--prompt-len"), new_tokens=a.new_tokens,
                  warmup_s=a.warmup_s, duration_s=a.duration_s, iterations=a.iterations, percentiles=percentiles,
                  quiet=a.quiet, per_layer=a.per_layer, trace=a.trace, plot_dir=a.plot, provider=a.provider,
                  dtype=a.dtype, kernels=a.kernels)
    print(json.dumps(doc, indent=1) if a.json else format_table(doc))
    return 0


def _cmd_inspect(a) -> int:
    from lowbit.runtime.inspect_artifact import describe

    print(describe(a.artifact, as_json=a.json))
    return 0


def _cmd_recipes(a) -> int:
    from lowbit.compiler.recipe import BUILTIN

    for name, r in BUILTIN.items():
        print(f"{name:18s} {r.describe()}")
    return 0


def _cmd_assets(a) -> int:
    from lowbit.demo.assets import main_assets

    return main_assets(a.json)


def _cmd_doctor(a) -> int:
    from lowbit.tools.doctor import main as doctor

    return doctor(a.json)


def _cmd_build_engine(a) -> int:
    from lowbit.plugins.tensorrt.engine import Limits, build_artifact_engine

    record = build_artifact_engine(a.artifact, Limits(a.max_batch, a.max_new_tokens, a.max_past),
                                   aot=not a.jit_plugins)
    if not a.quiet:
        print(f"built {a.artifact}/tensorrt/{record['file']} ({record['bytes'] / 2**20:.1f} MiB) with TensorRT "
              f"{record['tensorrt']} on {record['gpu']} in {record['seconds']} s", file=sys.stderr)
    return 0


def _runtime_device_args(p):
    p.add_argument("--device", default="cpu", help="torch backend: cpu (default) | cuda[:N] (Triton kernels) | auto")
    p.add_argument("--dtype", default="auto", help="torch backend: auto (float32 on CPU, float16 on CUDA) | "
                   "float32 | float16 | bfloat16")
    p.add_argument("--kernels", default="auto", choices=("auto", "reference"),
                   help="torch backend: auto (the device's fast kernels; on CPU, 4/8-bit matmuls of up to 16 tokens "
                   "in bfloat16) | reference (every op's reference kernel, the oracle)")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.targets import TARGETS

    p = argparse.ArgumentParser(prog="lowbit", description="Quantizing compiler and runtime for transformer LMs.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    c = sub.add_parser("compile", help="quantize a model into an artifact folder")
    c.add_argument("model", help="local transformers model folder, or 'demo'")
    c.add_argument("--recipe", "-r", default="rtn-w4g128", help="built-in recipe name or .toml file (see 'lowbit recipes')")
    c.add_argument("--target", "-t", default="torch", help="what to emit (default torch): " + "; ".join(
        f"{t.name}: {t.summary}" for t in TARGETS.values()))
    c.add_argument("--onnx-accuracy-level", type=int, default=0, metavar="N",
                   help="MatMulNBits accuracy_level for --target onnx: 0 exact float math (default), "
                        "4 int8 activations inside the kernel (faster on CPU, less exact)")
    c.add_argument("--no-onnx-fusions", action="store_true",
                   help="--target onnx: keep the plain ops instead of ONNX Runtime's fused ones "
                        "(SkipSimplifiedLayerNormalization, Gelu, ...)")
    c.add_argument("--onnx-exporter", default="lowbit", metavar="NAME",
                   help="--target onnx: lowbit (default) writes the shipped graph as ONNX itself, in seconds, and "
                        "falls back to torch.onnx for an op it does not know; torch.onnx always re-traces with it")
    c.add_argument("--trt-precision", default="float16", metavar="DTYPE",
                   help="--target tensorrt: the float type of the TensorRT ONNX (and engine): float16 (default), "
                        "bfloat16 or float32")
    c.add_argument("--output", "-o", required=True, help="artifact folder to create")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    c.add_argument("--calib", default="demo", help="calibration text file, or 'demo' (calib.txt); GPTQ only")
    c.add_argument("--calib-samples", type=int, default=128, help="random windows of calibration text (default 128)")
    c.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")
    c.add_argument("--device", default="auto", help="where passes run: auto (CUDA if present), cpu, cuda[:N]")
    c.add_argument("--resume", action="store_true", help="continue a killed compile from its last finished block")
    c.add_argument("--eval", default=None, metavar="TEXT", help="also measure perplexity before/after on TEXT (file or demo)")
    c.add_argument("--eval-windows", type=int, default=40, help="windows for --eval (default 40)")
    c.add_argument("--eval-seq-len", type=int, default=512, help="window length for --eval (default 512)")
    c.add_argument("--lkd-steps", type=int, default=None, help="LKD: Adam steps per block (-lkd recipes; default 100)")
    c.add_argument("--lkd-lr", type=float, default=None, help="LKD: learning rate (default 1e-4)")
    c.add_argument("--lkd-batch", type=int, default=None, help="LKD: sequences per step (default 4)")
    c.add_argument("--lkd-data", default=None, help="LKD data: calib (the --calib text, default) or random tokens")
    c.add_argument("--lkd-samples", type=int, default=None, help="LKD: sequences distilled on (default 32)")
    c.add_argument("--lkd-seq-len", type=int, default=None, help="LKD: tokens per sequence (default 256)")
    c.add_argument("--lkd-inputs", default=None, help="LKD: the student's block input: quantized (the distilled "
                   "blocks' output, default) or float (the float model's)")
    c.add_argument("--lkd-loss", default=None, help="LKD loss: token (each token's squared error relative to its "
                   "energy, default) or mse")
    c.set_defaults(fn=_cmd_compile)

    r = sub.add_parser("run", help="generate text with an artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt", "-p", action="append", required=True, help="prompt text; repeat for a batch")
    r.add_argument("--max-new-tokens", "-n", type=int, default=32)
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--backend", default="auto", help="auto (ort for onnx artifacts, tensorrt for tensorrt ones) | torch | ort | "
                   "tensorrt")
    r.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(r)
    r.add_argument("--json", action="store_true", help="one JSON object per prompt")
    r.set_defaults(fn=_cmd_run)

    e = sub.add_parser("eval", help="perplexity of an artifact or a model folder on a text")
    e.add_argument("target", help="artifact folder, model folder, or 'demo' (the float demo model)")
    e.add_argument("--text", default="demo", help="UTF-8 text file, or 'demo' (eval.txt); default demo")
    e.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--embeddings", default=None, metavar="TEXT",
                   help="encoders: mean cosine of sentence embeddings vs the float source over TEXT's sentences "
                        "(file or demo)")
    e.add_argument("--max-sentences", type=int, default=256, help="sentences for --embeddings (default 256)")
    e.add_argument("--backend", default="auto", help="for artifacts: auto (ort for onnx artifacts, tensorrt for tensorrt "
                   "ones) | torch | ort | tensorrt")
    e.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(e)
    e.add_argument("--json", action="store_true", help="print {ppl, tokens, windows, ...} as JSON")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(fn=_cmd_eval)

    pr = sub.add_parser("profile", help="latency of artifacts: prefill, decode per token, end to end, memory")
    pr.add_argument("artifacts", nargs="+", help="artifact folder(s); several are compared against the first")
    pr.add_argument("--backend", default="auto", help="auto (ort for onnx artifacts, tensorrt for tensorrt ones) | torch | ort | "
                   "tensorrt")
    pr.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(pr)
    pr.add_argument("--batch", default="1", help="comma list of batch sizes (default 1)")
    pr.add_argument("--prompt-len", default="128", help="comma list of prompt lengths in tokens (default 128)")
    pr.add_argument("--new-tokens", type=int, default=None,
                    help="greedy decode steps per iteration (default 64; encoders: 0, a forward pass only)")
    pr.add_argument("--warmup-s", type=float, default=2.0, help="untimed warm-up seconds (default 2)")
    pr.add_argument("--duration-s", type=float, default=10.0, help="timed seconds per run (default 10)")
    pr.add_argument("--iterations", type=int, default=None, help="timed iterations per run instead of a duration")
    pr.add_argument("--percentiles", default="50,90,95,99", help="comma list (default 50,90,95,99)")
    pr.add_argument("--per-layer", action="store_true",
                    help="also break one prefill and the decode step down by layer and op kind (CPU)")
    pr.add_argument("--trace", default=None, metavar="FILE",
                    help="with --per-layer: write the profiled steps as Chrome-trace JSON (Perfetto, chrome://tracing); "
                    "several runs get FILE-<artifact>-<backend>-b<batch>-p<prompt>.json")
    pr.add_argument("--plot", default=None, metavar="DIR",
                    help="write PNG plots (latency vs batch and prompt length, the breakdown) to DIR; needs matplotlib")
    pr.add_argument("--json", action="store_true", help="print the JSON document (docs/formats.md) instead of the table")
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pr.set_defaults(fn=_cmd_profile)

    i = sub.add_parser("inspect", help="describe an artifact: recipe, layers, sizes, hashes")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    be = sub.add_parser("build-engine", help="build the TensorRT engine of a --target tensorrt artifact, on the "
                        "machine (TensorRT >= 10.7, NVIDIA GPU) it will run on")
    be.add_argument("artifact")
    be.add_argument("--max-batch", type=int, default=8, help="largest batch the engine takes (default 8)")
    be.add_argument("--max-new-tokens", type=int, default=512, help="largest prefill, in tokens (default 512)")
    be.add_argument("--max-past", type=int, default=2048, help="largest KV cache of a decode step (default 2048)")
    be.add_argument("--jit-plugins", action="store_true", help="run lowbit's plugins through Python (Triton's "
                    "launcher) instead of their AOT-compiled kernels; the engine then needs Python to run")
    be.add_argument("--quiet", "-q", action="store_true")
    be.set_defaults(fn=_cmd_build_engine)

    rc = sub.add_parser("recipes", help="list the built-in recipes")
    rc.set_defaults(fn=_cmd_recipes)

    s = sub.add_parser("assets", help="fetch and convert the demo model, encoder and text (cached)")
    s.add_argument("--json", action="store_true", help='print {"model", "encoder", "calib", "eval"} paths')
    s.set_defaults(fn=_cmd_assets)

    d = sub.add_parser("doctor", help="what this machine has for lowbit: versions, CPU flags, GPUs, usable targets "
                       "and backends")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(fn=_cmd_doctor)
    return p


def main(argv=None) -> int:
    from lowbit.errors import LowbitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def run_script(main_fn, prog: str):
    """Entry point for bench/ scripts: a LowbitError is one line on stderr and exit 2, like the CLI."""
    from lowbit.errors import LowbitError

    try:
        sys.exit(main_fn())
    except LowbitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
