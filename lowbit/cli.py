"""The ``lowbit`` command: compile | run | serve | eval | profile | inspect | keygen | sign | verify | build-engine |
recipes | assets | doctor.

User errors (LowbitError) print one line on stderr and exit 2 with no traceback; progress goes to
stderr so ``--json`` output on stdout can be piped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _cmd_compile(a) -> int:
    from lowbit.compiler.pipeline import CalibrationArgs, compile_model

    calib = CalibrationArgs(a.calib, a.calib_samples, a.calib_seq_len, a.seed)
    out = compile_model(a.model, recipe=a.recipe, target=a.target, out=a.output, force=a.force, quiet=a.quiet,
                        calib=calib, device=a.device, resume=a.resume, eval_text=a.eval, eval_windows=a.eval_windows,
                        eval_seq_len=a.eval_seq_len, fuse=a.fuse, dtype=a.dtype, budget_bits=a.budget_bits,
                        **_target_option_keywords(a), lkd=_lkd_flags(a))
    if os.environ.get("RANK", "0") == "0":          # under torchrun, rank 0 wrote the artifact
        print(out)
    return 0


def _target_option_keywords(a) -> dict:
    """The target-option flags given on the command line, as ``lowbit.compile`` keywords."""
    from lowbit.options import keywords
    from lowbit.targets import TARGETS, options_class

    names = {k for t in TARGETS.values() if t.options for k in keywords(options_class(t.name))}
    return {k: getattr(a, k) for k in sorted(names) if getattr(a, k) is not None}


def _lkd_flags(a) -> dict:
    """The --lkd-* flags given, as LKDSettings fields, their ranges checked before anything loads."""
    from lowbit.options import keywords
    from lowbit.passes.settings import LKDSettings

    given = {name: getattr(a, kw) for kw, name in keywords(LKDSettings).items() if getattr(a, kw) is not None}
    LKDSettings(**given)
    return given


def _cmd_run(a) -> int:
    from dataclasses import asdict

    import lowbit
    from lowbit.errors import LowbitError
    from lowbit.runtime.sampling import GenerationSettings
    from lowbit.runtime.text import CHAT_MAX_NEW_TOKENS

    if a.json and a.stream:
        raise LowbitError("--json prints whole completions; drop --stream (or --json)")
    if not a.prompt and not a.chat:
        raise LowbitError("give a prompt with --prompt (-p), or --chat to chat on stdin")
    settings = GenerationSettings(                     # its ranges checked before the model loads
        max_new_tokens=a.max_new_tokens if a.max_new_tokens is not None else CHAT_MAX_NEW_TOKENS if a.chat else 32,
        do_sample=a.sample,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, seed=a.seed, stop=tuple(a.stop or ()))
    # lowbit.load, not Engine.load: without torch an ONNX artifact still runs (runtime/lite.py).
    eng = lowbit.load(a.artifact, backend=a.backend, provider=a.provider, device=a.device, dtype=a.dtype,
                      kernels=a.kernels, verify=a.verify_key or True)
    kw = asdict(settings)
    if a.chat:
        return _chat(eng, a, kw)
    if a.stream:
        for prompt in a.prompt:
            print(prompt, end="", flush=True)
            eng.generate(prompt, callback=lambda piece: print(piece, end="", flush=True), **kw)
            print()
        return 0
    texts = eng.generate(a.prompt, **kw)
    for prompt, text in zip(a.prompt, texts):
        if a.json:
            print(json.dumps({"prompt": prompt, "completion": text}))
        else:
            print(f"{prompt}{text}")
    return 0


def _chat(eng, a, kw: dict) -> int:
    """``lowbit run --chat``: each --prompt as a one-turn conversation, or without one, a conversation on stdin (a
    line per turn, the history kept)."""
    eng.chat_template()                                 # refused now, before any input is read, when it has none
    system = [{"role": "system", "content": a.system}] if a.system else []
    show = (lambda piece: print(piece, end="", flush=True)) if a.stream else None
    if a.prompt:
        for prompt in a.prompt:
            reply = eng.chat(system + [{"role": "user", "content": prompt}], callback=show, **kw)["content"]
            print(json.dumps({"prompt": prompt, "reply": reply}) if a.json else "" if a.stream else reply)
        return 0
    history = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = eng.chat(history, callback=show, **kw)["content"]
        history.append({"role": "assistant", "content": reply})
        print(json.dumps({"reply": reply}) if a.json else "" if a.stream else reply, flush=True)


def _cmd_eval(a) -> int:
    from lowbit.tools.eval import evaluate_embeddings, evaluate_perplexity

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


def _int_list(text: str, what: str, meaning: str) -> list[int]:
    from lowbit.errors import LowbitError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"{what} '{text}': give comma-separated integers, e.g. 1,4") from None
    if not values:
        raise LowbitError(f"{what} '{text}': give at least one integer >= 1, e.g. 1,4")
    for v in values:
        if v < 1:
            raise LowbitError(f"{what} {v}: {meaning}; give integers >= 1")
    return values


def _cmd_profile(a) -> int:
    from lowbit.errors import LowbitError
    from lowbit.tools.profiler import format_table, profile

    try:
        percentiles = [float(v) for v in a.percentiles.split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"--percentiles '{a.percentiles}': give comma-separated numbers, e.g. 50,90,99") from None
    doc = profile(a.artifacts, backend=a.backend, device=a.device,
                  batches=_int_list(a.batch, "--batch", "a batch needs at least one sequence"),
                  prompt_lens=_int_list(a.prompt_len, "--prompt-len", "a prompt needs at least one token"),
                  new_tokens=a.new_tokens, warmup_s=a.warmup_s, duration_s=a.duration_s, iterations=a.iterations,
                  percentiles=percentiles, quiet=a.quiet, per_layer=a.per_layer, trace=a.trace, plot_dir=a.plot,
                  provider=a.provider, dtype=a.dtype, kernels=a.kernels)
    print(json.dumps(doc, indent=1) if a.json else format_table(doc))
    return 0


def _cmd_keygen(a) -> int:
    from lowbit.format.signing import keygen

    private, public = keygen(a.name)
    print(f"wrote {private} (private: keep it to yourself) and {public} (give it to whoever runs your artifacts)")
    return 0


def _cmd_sign(a) -> int:
    from lowbit.format.signing import sign

    print(f"signed: {sign(a.artifact, a.key)}")
    return 0


def _cmd_verify(a) -> int:
    from lowbit.format.artifact import read_manifest
    from lowbit.format.signing import verify_signature

    manifest = verify_signature(a.artifact, a.key) if a.key else read_manifest(a.artifact)
    print(f"{a.artifact}: {len(manifest['files'])} files match their hashes" + (f"; signed by {a.key}'s owner"
                                                                                if a.key else ""))
    return 0


def _cmd_inspect(a) -> int:
    from lowbit.tools.inspect_artifact import describe

    print(describe(a.artifact, as_json=a.json))
    return 0


def _cmd_recipes(a) -> int:
    from lowbit.passes.recipe import BUILTIN

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
    from lowbit.kernels.tensorrt.engine import Limits
    from lowbit.tools.build_engine import build_artifact_engine

    record = build_artifact_engine(a.artifact, Limits(a.max_batch, a.max_new_tokens, a.max_past),
                                   aot=not a.jit_plugins)
    if not a.quiet:
        print(f"built {a.artifact}/tensorrt/{record['file']} ({record['bytes'] / 2**20:.1f} MiB) with TensorRT "
              f"{record['tensorrt']} on {record['gpu']} in {record['seconds']} s", file=sys.stderr)
    return 0


def _int_in(lo: int, hi=None, hi_text=None):
    """Parser of an integer in lo..hi (no upper bound when hi is None); ValueError says the accepted range."""
    accepted = f"at least {lo}" if hi is None else f"in {lo}..{hi_text or hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer {accepted}, got '{text}'") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be {accepted}, got {value}")
        return value
    return parse


def _float_from(lo: float, strict: bool):
    """Parser of a finite number > lo (strict) or >= lo."""
    accepted = f"{'>' if strict else '>='} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lo or (strict and value == lo):
            raise ValueError(f"must be a finite number {accepted}, got '{text}'")
        return value
    return parse


def _checked(parse):
    """An argparse action storing ``parse(text)``. Its ValueError becomes a LowbitError naming the flag, raised
    while parsing: one line and exit 2 like every other user error, before any work starts."""
    class Checked(argparse.Action):
        def __call__(self, parser, namespace, text, option_string=None):
            from lowbit.errors import LowbitError

            try:
                setattr(namespace, self.dest, parse(text))
            except ValueError as e:
                raise LowbitError(f"{option_string} {e}") from None
    return Checked


_COUNT = _checked(_int_in(1))            # how many of something: windows, samples, steps, sequences
_WINDOW = _checked(_int_in(2))           # a token window: its first token is only context, so at least 2
_SEED = _checked(_int_in(0, 2**64 - 1, "2**64-1"))    # what both torch's and numpy's generators take


def _runtime_device_args(p):
    p.add_argument("--device", default="cpu", help="torch backend: cpu (default) | cuda[:N] (Triton kernels) | auto")
    p.add_argument("--dtype", default="auto", help="torch backend: auto (float32 on CPU, float16 on CUDA) | "
                   "float32 | float16 | bfloat16")
    p.add_argument("--kernels", default="auto", choices=("auto", "reference"),
                   help="torch backend: auto (the device's fast kernels; on CPU, 4/8-bit matmuls of up to 16 tokens "
                   "in bfloat16) | reference (every op's reference kernel, the oracle)")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    p = argparse.ArgumentParser(prog="lowbit", description="Quantizing compiler and runtime for transformer LMs.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    _add_compile(sub)
    _add_run(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_profile(sub)
    _add_artifact(sub)
    _add_setup(sub)
    return p


def _add_compile(sub) -> None:
    """lowbit compile."""
    from lowbit.options import add_flags
    from lowbit.passes.settings import LKDSettings
    from lowbit.targets import TARGETS, options_class

    c = sub.add_parser("compile", help="quantize a model into an artifact folder")
    c.add_argument("model", help="local transformers model folder, or 'demo'")
    c.add_argument("--recipe", "-r", default="rtn-w4g128", help="built-in recipe name or .toml file (see 'lowbit recipes')")
    c.add_argument("--target", "-t", default="torch", help="what to emit (default torch): " + "; ".join(
        f"{t.name}: {t.summary}" for t in TARGETS.values()))
    for t in TARGETS.values():       # each target's options, flags derived from its options class
        if t.options:
            add_flags(c.add_argument_group(f"--target {t.name}"), options_class(t.name))
    c.add_argument("--output", "-o", required=True, help="artifact folder to create")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    c.add_argument("--calib", default="demo", help="calibration text file, or 'demo' (calib.txt); GPTQ only")
    c.add_argument("--calib-samples", action=_COUNT, default=128,
                   help="random windows of calibration text (default 128)")
    c.add_argument("--calib-seq-len", action=_WINDOW, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", action=_SEED, default=0, help="seed for choosing calibration windows")
    c.add_argument("--device", default="auto", help="where passes run: auto (CUDA if present), cpu, cuda[:N]")
    c.add_argument("--dtype", default="auto", help="precision of the model's float weights and of what stays "
                   "unquantized: auto (the checkpoint's, default) | bfloat16 | float16 | float32")
    c.add_argument("--resume", action="store_true", help="continue a killed compile from its last finished block")
    c.add_argument("--budget-bits", action=_checked(_float_from(0, True)), default=None, metavar="BITS",
                   help="choose each layer's bits and group (the recipe's method) to lose least within BITS stored "
                   "bits per weight, scales and zero points included (w4g64 is 4.375, w3g64 3.375); the plan is "
                   "written to the artifact's plan.toml")
    c.add_argument("--eval", default=None, metavar="TEXT", help="also measure perplexity before/after on TEXT (file or demo)")
    c.add_argument("--eval-windows", action=_COUNT, default=40, help="windows for --eval (default 40)")
    c.add_argument("--eval-seq-len", action=_WINDOW, default=512, help="window length for --eval (default 512)")
    c.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="skip the fusion rules (lowbit.rules) on the quantized graph")
    add_flags(c.add_argument_group("distillation (recipes with lkd = true, e.g. the -lkd ones; over the recipe's "
                                   "lkd_* values)"), LKDSettings)
    c.set_defaults(fn=_cmd_compile)


def _add_run(sub) -> None:
    """lowbit run."""
    r = sub.add_parser("run", help="generate text with an artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt", "-p", action="append", help="prompt text; repeat for a batch")
    r.add_argument("--chat", action="store_true", help="chat with the model's own chat template: each --prompt is "
                   "a user's message, or without --prompt a conversation on stdin, a line per turn")
    r.add_argument("--system", default=None, help="with --chat: the system message")
    r.add_argument("--stream", action="store_true", help="print the text as it is generated")
    # Ranges: runtime.sampling.GenerationSettings (in _cmd_run), the one definition the library shares.
    r.add_argument("--max-new-tokens", "-n", type=int, default=None,
                   help="tokens to generate, >= 1 (default 32; with --chat 256)")
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float, default=1.0, help="> 0 with --sample (default 1)")
    r.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 (default): all")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, 0 < p <= 1; 1 (default): off")
    r.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the likeliest's probability, 0 <= p <= 1; 0 (default): off")
    r.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output; 1 (default): off")
    r.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, per token already generated")
    r.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, per occurrence generated")
    r.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text before this string; repeat for several")
    r.add_argument("--seed", action=_SEED, default=None)
    r.add_argument("--backend", default="auto", help="auto (ort for onnx artifacts, tensorrt for tensorrt ones) | torch | ort | "
                   "tensorrt")
    r.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(r)
    r.add_argument("--verify-key", default=None, metavar="PUB",
                   help="run the artifact only if it is signed by this Ed25519 public key (lowbit sign)")
    r.add_argument("--json", action="store_true", help="one JSON object per prompt")
    r.set_defaults(fn=_cmd_run)


def _add_serve(sub) -> None:
    """lowbit serve."""
    r = sub.add_parser("serve", help="serve an artifact over HTTP, OpenAI-compatible (pip install 'lowbit[serve]')")
    r.add_argument("artifact")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    r.add_argument("--port", action=_checked(_int_in(0, 65535, "65535")), default=8000, help="default 8000")
    r.add_argument("--name", default=None, help="the model's name in the API (default: the artifact folder's)")
    r.add_argument("--max-batch", action=_COUNT, default=16, help="sequences decoded together (default 16)")
    r.add_argument("--max-waiting", action=_COUNT, default=256,
                   help="sequences queued beyond the batch before requests get HTTP 503 (default 256)")
    r.add_argument("--request-timeout", action=_checked(_float_from(0, strict=True)), default=600.0,
                   help="seconds a request may run (default 600)")
    r.add_argument("--default-max-tokens", action=_COUNT, default=256,
                   help="tokens generated when a request names no max_tokens (default 256)")
    r.add_argument("--max-prefill-tokens", action=_COUNT, default=256,
                   help="prompt tokens prefilled per decode step while sequences decode (longer prompts "
                        "prefill in chunks): fewer keeps the running streams' token gaps short, more shortens the "
                        "time to a first token (default 256)")
    r.add_argument("--backend", default="auto", help="auto | torch | ort")
    r.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(r)
    r.add_argument("--verify-key", default=None, metavar="PUB",
                   help="serve the artifact only if it is signed by this Ed25519 public key (lowbit sign)")
    r.set_defaults(fn=_cmd_serve)


def _cmd_serve(a) -> int:
    from lowbit.runtime.serve import ServeLimits, serve

    limits = ServeLimits(a.max_batch, a.max_waiting, a.request_timeout, a.default_max_tokens, a.max_prefill_tokens)
    serve(a.artifact, host=a.host, port=a.port, name=a.name, limits=limits, backend=a.backend, provider=a.provider,
          device=a.device, dtype=a.dtype, kernels=a.kernels, verify=a.verify_key or True)
    return 0


def _add_eval(sub) -> None:
    """lowbit eval."""
    e = sub.add_parser("eval", help="perplexity of an artifact or a model folder on a text")
    e.add_argument("target", help="artifact folder, model folder, or 'demo' (the float demo model)")
    e.add_argument("--text", default="demo", help="UTF-8 text file, or 'demo' (eval.txt); default demo")
    e.add_argument("--seq-len", action=_WINDOW, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-windows", action=_COUNT, default=None, help="score at most this many windows")
    e.add_argument("--batch-size", action=_COUNT, default=1)
    e.add_argument("--embeddings", default=None, metavar="TEXT",
                   help="encoders: mean cosine of sentence embeddings vs the float source over TEXT's sentences "
                        "(file or demo)")
    e.add_argument("--max-sentences", action=_COUNT, default=256, help="sentences for --embeddings (default 256)")
    e.add_argument("--backend", default="auto", help="for artifacts: auto (ort for onnx artifacts, tensorrt for tensorrt "
                   "ones) | torch | ort | tensorrt")
    e.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(e)
    e.add_argument("--json", action="store_true", help="print {ppl, tokens, windows, ...} as JSON")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(fn=_cmd_eval)


def _add_profile(sub) -> None:
    """lowbit profile."""
    pr = sub.add_parser("profile", help="latency of artifacts: prefill, decode per token, end to end, memory")
    pr.add_argument("artifacts", nargs="+", help="artifact folder(s); several are compared against the first")
    pr.add_argument("--backend", default="auto", help="auto (ort for onnx artifacts, tensorrt for tensorrt ones) | torch | ort | "
                   "tensorrt")
    pr.add_argument("--provider", default="auto", help="ONNX Runtime provider for --backend ort: auto | cpu | cuda")
    _runtime_device_args(pr)
    pr.add_argument("--batch", default="1", help="comma list of batch sizes (default 1)")
    pr.add_argument("--prompt-len", default="128", help="comma list of prompt lengths in tokens (default 128)")
    pr.add_argument("--new-tokens", action=_checked(_int_in(0)), default=None,
                    help="greedy decode steps per iteration (default 64; encoders: 0, a forward pass only)")
    pr.add_argument("--warmup-s", action=_checked(_float_from(0, strict=False)), default=2.0,
                    help="untimed warm-up seconds (default 2)")
    pr.add_argument("--duration-s", action=_checked(_float_from(0, strict=True)), default=10.0,
                    help="timed seconds per run (default 10)")
    pr.add_argument("--iterations", action=_COUNT, default=None, help="timed iterations per run instead of a duration")
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


def _add_artifact(sub) -> None:
    """lowbit inspect | keygen | sign | verify | build-engine: the tools that work on one artifact."""
    i = sub.add_parser("inspect", help="describe an artifact: recipe, layers, sizes, hashes")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)
    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts (NAME.key, NAME.pub)")
    kg.add_argument("name", help="path prefix of the two key files")
    kg.set_defaults(fn=_cmd_keygen)
    sg = sub.add_parser("sign", help="sign an artifact (its manifest, which hashes every file) with a private key")
    sg.add_argument("artifact")
    sg.add_argument("--key", required=True, help="Ed25519 private key, PEM (lowbit keygen)")
    sg.set_defaults(fn=_cmd_sign)
    vf = sub.add_parser("verify", help="check an artifact's file hashes and, with --key, its signature")
    vf.add_argument("artifact")
    vf.add_argument("--key", default=None, help="the signer's Ed25519 public key, PEM")
    vf.set_defaults(fn=_cmd_verify)
    be = sub.add_parser("build-engine", help="build the TensorRT engine of a --target tensorrt artifact, on the "
                        "machine (TensorRT >= 10.7, NVIDIA GPU) it will run on")
    be.add_argument("artifact")
    be.add_argument("--max-batch", action=_COUNT, default=8, help="largest batch the engine takes (default 8)")
    be.add_argument("--max-new-tokens", action=_COUNT, default=512, help="largest prefill, in tokens (default 512)")
    be.add_argument("--max-past", action=_COUNT, default=2048, help="largest KV cache of a decode step (default 2048)")
    be.add_argument("--jit-plugins", action="store_true", help="run lowbit's plugins through Python (Triton's "
                    "launcher) instead of their AOT-compiled kernels; the engine then needs Python to run")
    be.add_argument("--quiet", "-q", action="store_true")
    be.set_defaults(fn=_cmd_build_engine)


def _add_setup(sub) -> None:
    """lowbit recipes | assets | doctor."""
    rc = sub.add_parser("recipes", help="list the built-in recipes")
    rc.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("assets", help="fetch and convert the demo model, encoder and text (cached)")
    s.add_argument("--json", action="store_true", help='print {"model", "encoder", "calib", "eval"} paths')
    s.set_defaults(fn=_cmd_assets)
    d = sub.add_parser("doctor", help="what this machine has for lowbit: versions, CPU flags, GPUs, usable targets "
                       "and backends")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(fn=_cmd_doctor)


def main(argv=None) -> int:
    from lowbit.errors import LowbitError

    # The CLI owns its process (the library leaves these alone): transformers stays quiet and offline, lowbit
    # printing its own progress and never downloading.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return 2
        code = args.fn(args)
        sys.stdout.flush()            # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``lowbit inspect ART | head``): stop quietly, as the Python docs' note on
    SIGPIPE recommends. stdout goes to devnull so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


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
