"""The compile pipeline: load -> trace -> passes -> lower -> artifact, with progress and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lowbit.format import artifact
from lowbit.frontend.load import (eos_token_ids, hash_model_folder, load_model, load_tokenizer, max_positions,
                                  read_config, resolve_model_path, task_of)
from lowbit.frontend.trace import trace
from lowbit.progress import say, timed
from lowbit.compiler.output_path import check_output_path
from lowbit.passes.recipe import load_recipe
from lowbit.compiler.report import outlier_lines, write_report
from lowbit.device import pick_device
from lowbit import targets
from lowbit.errors import LowbitError
from lowbit.passes.gptq import gptq_pass
from lowbit.passes.rtn import quantizable, rtn_pass

PASSES = {"rtn": rtn_pass, "gptq": gptq_pass}


@dataclass
class CalibrationArgs:
    text: str = "demo"            # file or 'demo' (calib.txt)
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chunk: int = 8                # samples run together through one node

    def to_dict(self) -> dict:
        return {"text": self.text, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}


def lkd_options(recipe, lkd):
    """The LKD options for this compile, or None: the recipe's steps/lr/batch, then ``lkd`` (an LKDOptions, or
    a dict of fields from the command line) over them."""
    from dataclasses import replace as dc_replace

    from lowbit.passes.lkd import LKDOptions

    if isinstance(lkd, dict):
        lkd = {k: v for k, v in lkd.items() if v is not None}
    if not recipe.lkd:
        if lkd:
            raise LowbitError(f"LKD options were given but recipe '{recipe.name}' does not distil; use a '-lkd' recipe "
                              "(e.g. zq-w4a8-mixed-lkd) or set lkd = true in the recipe file")
        return None
    if not recipe.quantizes:
        raise LowbitError(f"LKD needs quantized weights; recipe '{recipe.name}' keeps the model float")
    opts = LKDOptions(steps=recipe.lkd_steps, lr=recipe.lkd_lr, batch=recipe.lkd_batch)
    if isinstance(lkd, LKDOptions):
        opts = lkd
    elif lkd:
        opts = dc_replace(opts, **lkd)
    opts.check()
    return opts


def check_groups(graph, recipe):
    for site, spec in quantizable(graph, recipe):
        if spec.group_size > site.in_features:
            raise LowbitError(f"group_size {spec.group_size} is larger than layer {site.name}'s input size "
                              f"K={site.in_features}; use a group <= K, or group_size = 0 for per-channel")


def compile_model(model: str, recipe="rtn-w4g128", target: str = "torch", out=None, force: bool = False,
                  quiet: bool = False, calib: Optional[CalibrationArgs] = None, device: str = "auto",
                  resume: bool = False, eval_text: Optional[str] = None, eval_windows: int = 40,
                  eval_seq_len: int = 512, lkd=None, options=None, **option_keywords) -> Path:
    """Compile ``model`` (a folder or 'demo') with ``recipe`` into an artifact folder ``out``.

    ``lkd`` (``passes.lkd.LKDOptions``) sets the distillation data and overrides the recipe's LKD steps, lr
    and batch; it needs a recipe with ``lkd = true``. The target's options: ``options`` (its options object,
    e.g. ``lowering.onnx.options.OnnxOptions``) or their keywords (``onnx_accuracy_level``, ``onnx_fusions``,
    ``onnx_exporter``, ``trt_precision``: ``lowbit.targets.target_options``).
    """
    from lowbit.passes.checkpoint import Checkpoint

    lowering = targets.lowering(target)
    if out is None:
        raise LowbitError("no output folder given; pass -o DIR")
    out = Path(out)
    options = targets.target_options(target, options, **option_keywords)
    recipe = lowering.prepare(load_recipe(recipe), options)
    calib = calib or CalibrationArgs()
    device = pick_device(device)
    check_output_path(out)
    # The output path stays locked from here to the artifact's move into place: a second compile into it
    # fails at once instead of racing this one.
    with artifact.writing(out):
        artifact.check_output_dir(out, force)
        # Validate the model folder and texts before any progress output, so a bad input is one clean line.
        model_path = resolve_model_path(model)
        config = read_config(model_path)
        from lowbit.metrics import read_text, windows

        lkd_opts = lkd_options(recipe, lkd)
        needs_text = recipe.needs_calibration or (lkd_opts is not None and lkd_opts.data == "calib")
        calib_text = read_text(calib.text, "calib") if needs_text else None
        if eval_text and task_of(config) != "causal-lm":
            raise LowbitError("--eval measures perplexity, which needs a causal LM; this model is an encoder (use "
                              "'lowbit eval ARTIFACT --embeddings TEXT' after compiling)")
        eval_body = read_text(eval_text, "eval") if eval_text else None
        calib_ids = eval_wins = lkd_ids = None
        if calib_text is not None or eval_body is not None:
            tokenizer = load_tokenizer(model_path)
            if tokenizer is None:
                raise LowbitError(f"'{model_path}' has no tokenizer; calibration and --eval need one to tokenize text")
            from lowbit.ir.calibration import calibration_windows

            if calib_text is not None and recipe.needs_calibration:
                calib_ids = calibration_windows(tokenizer, calib_text, calib.samples, calib.seq_len, calib.seed,
                                                max_positions(config))
            if lkd_opts is not None and lkd_opts.data == "calib":
                lkd_ids = calibration_windows(tokenizer, calib_text, lkd_opts.samples, lkd_opts.seq_len, lkd_opts.seed,
                                              max_positions(config))
            if eval_body is not None:
                if eval_seq_len > max_positions(config):
                    raise LowbitError(f"--eval-seq-len {eval_seq_len} is longer than the model's context of "
                                      f"{max_positions(config)} tokens")
                eval_wins = windows(tokenizer, eval_body, eval_seq_len, eval_windows)
        timings: dict = {}
        t0 = time.perf_counter()
        # Load and trace silently, then validate against the real layer shapes: a bad recipe for this model is
        # still a single error line. Progress starts once the inputs are known to be good.
        with timed(timings, "load"):
            loaded = load_model(str(model_path))
            source_hash = hash_model_folder(loaded.path)
        with timed(timings, "trace"):
            graph = trace(loaded)
        check_groups(graph, recipe)
        if lkd_opts is not None and not any(site.block for site, _ in quantizable(graph, recipe)):
            raise LowbitError(f"LKD needs quantized weights in the model's blocks; recipe '{recipe.name}' quantizes none")
        lowering.check(graph, recipe)
        say(f"loaded {model} in {timings['load']:.1f}s, traced in {timings['trace']:.1f}s: {len(graph.sites)} "
            f"quantizable matmuls in {len([b for b in graph.blocks if b])} blocks", quiet)
        metrics: dict = {}
        if eval_wins is not None:
            from lowbit.metrics import perplexity

            with timed(timings, "eval_before", quiet, "perplexity before quantization"):
                metrics["ppl_before"] = perplexity(lambda ids: loaded.model(input_ids=ids, use_cache=False).logits,
                                                   eval_wins, show_progress=not quiet)
        if lkd_opts is not None:
            from lowbit.passes.lkd import lkd_pass

            if lkd_ids is None:          # --lkd-data random: uniform random token sequences, no text needed
                gen = torch.Generator().manual_seed(lkd_opts.seed)
                lkd_ids = torch.randint(0, loaded.config.vocab_size, (lkd_opts.samples, lkd_opts.seq_len), generator=gen)
            with timed(timings, "lkd", quiet, f"layer-by-layer distillation, {lkd_opts.steps} steps per block"):
                lkd_info = lkd_pass(loaded.model, graph, recipe, lkd_ids, lkd_opts, show_progress=not quiet)
            blocks = list(lkd_info["blocks"].values())
            before = sum(b["loss_before"] for b in blocks) / len(blocks)
            after = sum(min(b["loss_after"], b["loss_before"]) for b in blocks) / len(blocks)
            say(f"LKD ({lkd_opts.loss} loss): block loss reduced in {sum(b['kept'] for b in blocks)} of {len(blocks)} "
                f"blocks; mean {before:.4g} -> {after:.4g}", quiet)
        pass_info: dict = {}
        if recipe.method in PASSES:
            ckpt = None
            if recipe.needs_calibration:
                ckpt = Checkpoint(out, {"source": source_hash, "recipe": recipe.to_dict(), "calib": calib.to_dict()},
                                  resume, quiet)
            with timed(timings, f"pass_{recipe.method}", quiet, f"{recipe.method} quantization on {device}"):
                pass_info = PASSES[recipe.method](graph, recipe, calib_ids=calib_ids, device=device,
                                                  show_progress=not quiet, checkpoint=ckpt, chunk=calib.chunk)
            for line in outlier_lines(graph):
                say(line, quiet)
        if eval_wins is not None:
            from lowbit.metrics import perplexity

            with timed(timings, "eval_after", quiet, "perplexity after quantization"):
                metrics["ppl_after"] = perplexity(lambda ids: graph(ids, torch.ones_like(ids)), eval_wins,
                                                  show_progress=not quiet)
            say(f"perplexity {metrics['ppl_before']['ppl']:.3f} -> {metrics['ppl_after']['ppl']:.3f}", quiet)

        rules_info = None
        if recipe.fuse and lowering.fuse:
            from lowbit.rules import apply_rules

            with timed(timings, "fuse"):
                rules_info = apply_rules(graph)
            say("fusion rules: " + ", ".join(f"{k} fired {v['fired']}x" for k, v in rules_info.items()), quiet)

        def fill(tmp: Path) -> dict:
            lowered = lowering.write(tmp, graph, loaded, recipe, options, timings, quiet)
            timings["total"] = round(time.perf_counter() - t0, 3)
            body = {"target": target,
                    "source": {"path": str(loaded.path.resolve()), "model_type": loaded.model_type,
                               "architectures": list(getattr(loaded.config, "architectures", None) or []),
                               "task": loaded.task, "sha256": source_hash},
                    "recipe": recipe.to_dict(), "timings": timings, "sizes": lowered.pop("sizes"), "metrics": metrics,
                    "device": device,
                    "generation": {"max_positions": loaded.max_positions, "eos_token_ids": eos_token_ids(loaded.config)}}
            if rules_info is not None:
                body["rules"] = rules_info
            body.update(lowered)
            if lkd_opts is not None:
                body["lkd"] = lkd_info
            if recipe.needs_calibration:
                body["calibration"] = {**calib.to_dict(), "tokens": pass_info.get("calib_tokens"),
                                       "peak_activation_bytes": pass_info.get("peak_activation_bytes")}
            write_report(tmp / "report.md", body, graph)
            return body

        path = artifact.write_artifact(out, fill, force=force)
        if recipe.needs_calibration:
            ckpt.discard()
        return path
