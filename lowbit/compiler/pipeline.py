"""The compile pipeline: load -> trace -> passes -> lower -> artifact, with progress and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from lowbit.format import artifact
from lowbit.frontend.load import (eos_token_ids, hash_model_folder, load_model, load_tokenizer, max_positions,
                                  read_config, resolve_model_path, round_weights, task_of)
from lowbit.frontend.trace import trace
from lowbit.frontend.weights import checkpoint_dtype
from lowbit.progress import say, timed
from lowbit.compiler.output_path import check_output_path
from lowbit.passes.recipe import ONLINE_ROTATIONS, load_recipe, to_toml
from lowbit.compiler.report import outlier_lines, write_report
from lowbit.device import dtype_name, named_dtype, pick_device
from lowbit import distributed, targets
from lowbit.errors import LowbitError
from lowbit.passes import PASSES
from lowbit.passes.awq import awq_pass
from lowbit.passes.budget import candidates, check_fits, plan
from lowbit.passes.rotate import find_plan, online_pass, online_sites, rotate_pass
from lowbit.passes.rtn import quantizable


@dataclass
class CalibrationArgs:
    text: str = "demo"            # file or 'demo' (calib.txt)
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chunk: int = 8                # samples run together through one node

    def to_dict(self) -> dict:
        return {"text": self.text, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}


def lkd_settings(recipe, lkd):
    """The LKD settings for this compile, or None: the recipe's, or ``lkd`` (an LKDSettings) instead, or ``lkd``'s
    entries (a dict of LKDSettings fields, e.g. from the --lkd-* flags; None values ignored) over the recipe's."""
    from lowbit.passes.settings import LKDSettings, check_types, field_types

    if isinstance(lkd, dict):
        lkd = {k: v for k, v in lkd.items() if v is not None}
    if recipe.lkd is None:
        if lkd:
            raise LowbitError(f"LKD options were given but recipe '{recipe.name}' does not distil; use a '-lkd' recipe "
                              "(e.g. zq-w4a8-mixed-lkd) or set lkd = true in the recipe file")
        return None
    if not recipe.quantizes:
        raise LowbitError(f"LKD needs quantized weights; recipe '{recipe.name}' keeps the model float")
    if isinstance(lkd, LKDSettings) or not lkd:
        return lkd or recipe.lkd
    types = field_types(LKDSettings)
    unknown = sorted(set(lkd) - set(types))
    if unknown:
        raise LowbitError(f"unknown LKD setting '{unknown[0]}'; valid: {', '.join(types)}")
    check_types("LKD settings", lkd, types)
    return replace(recipe.lkd, **lkd)


def check_groups(graph, recipe):
    for site, spec in quantizable(graph, recipe):
        if spec.group_size > site.in_features:
            raise LowbitError(f"group_size {spec.group_size} is larger than layer {site.name}'s input size "
                              f"K={site.in_features}; use a group <= K, or group_size = 0 for per-channel")


@dataclass
class _Job:
    """One compile: what the caller asked for, checked, and what each phase adds for the next."""
    model: str
    target: str
    out: Path
    recipe: object
    lowering: object
    options: object
    calib: CalibrationArgs
    device: str
    quiet: bool
    fuse: bool
    ranks: distributed.Ranks
    precision: Optional[torch.dtype] = None      # --dtype: the float weights' precision; None: the checkpoint's
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    pass_info: dict = field(default_factory=dict)
    checkpoint: object = None
    lkd_info: Optional[dict] = None
    awq_info: Optional[dict] = None
    rotate_info: Optional[dict] = None
    online_info: Optional[dict] = None
    budget_info: Optional[dict] = None
    formats: list = field(default_factory=list)  # the (bits, group) formats a size budget chooses from
    rules_info: Optional[dict] = None
    streamed: bool = False         # compiled block by block from the checkpoint (compiler/stream.py)


@dataclass
class _Inputs:
    """The model folder and the token windows the compile reads, validated before any progress output."""
    model_path: Path
    lkd: object = None             # LKDSettings, or None
    calib_ids: Optional[torch.Tensor] = None
    lkd_ids: Optional[torch.Tensor] = None
    eval_windows: Optional[torch.Tensor] = None


def compile_model(model: str, recipe="rtn-w4g128", target: str = "torch", out=None, force: bool = False,
                  quiet: bool = False, calib: Optional[CalibrationArgs] = None, device: str = "auto",
                  resume: bool = False, eval_text: Optional[str] = None, eval_windows: int = 40,
                  eval_seq_len: int = 512, lkd=None, fuse: bool = True, dtype: str = "auto", options=None,
                  budget_bits: Optional[float] = None, **option_keywords) -> Path:
    """Compile ``model`` (a folder or 'demo') with ``recipe`` into an artifact folder ``out``.

    ``lkd`` (``passes.settings.LKDSettings``, or a dict of its fields) replaces or overrides the recipe's LKD
    settings; it needs a recipe that distils. ``budget_bits`` sets the recipe's size budget (``passes/budget.py``).
    ``fuse=False`` skips the fusion rules. ``dtype`` (auto | bfloat16 | float16 | float32): the precision of the
    model's float weights, rounded to it before anything else (auto: the checkpoint's); the tensors left
    unquantized are stored in it. The target's options:
    ``options`` (its options object, e.g. ``lowering.onnx.options.OnnxOptions``) or their keywords
    (``onnx_accuracy_level``, ``onnx_fusions``, ``onnx_exporter``, ``trt_precision``: ``targets.target_options``).
    Under torchrun (``WORLD_SIZE`` > 1) each process runs this; GPTQ splits its calibration over them and rank 0
    writes the artifact (``lowbit.distributed``).
    """
    lowering = targets.lowering(target)
    if out is None:
        raise LowbitError("no output folder given; pass -o DIR")
    out = Path(out)
    options = targets.target_options(target, options, **option_keywords)
    recipe = load_recipe(recipe)
    if budget_bits is not None:
        recipe = replace(recipe, budget_bits=float(budget_bits))
    recipe = lowering.prepare(recipe, options)
    precision = storage_precision(dtype, target, lowering)
    device = pick_device(distributed.local_device(device))
    check_output_path(out)
    ranks = distributed.join(device)
    try:
        job = _Job(model, target, out, recipe, lowering, options, calib or CalibrationArgs(), device,
                   quiet or not ranks.main, fuse, ranks, precision)
        _check_distributed(job, lkd, resume)
        if not ranks.main:
            return _follow(job, lkd, resume, force)
        return _lead(job, lkd, eval_text, eval_windows, eval_seq_len, resume, force)
    finally:
        distributed.leave(ranks)


def storage_precision(dtype: str, target: str, lowering) -> Optional[torch.dtype]:
    """The torch dtype ``--dtype`` names (None for auto), refused when ``target`` stores one dtype of its own
    (``lowering.dtypes``)."""
    precision = named_dtype(dtype)
    allowed = getattr(lowering, "dtypes", None)
    if allowed is not None and dtype not in allowed:
        raise LowbitError(f"--target {target} stores {' or '.join(d for d in allowed if d != 'auto')} weights; "
                          f"drop --dtype {dtype} or pass --dtype {allowed[-1]}")
    return precision


def _check_distributed(job: _Job, lkd, resume: bool) -> None:
    """What a compile split over processes does not do yet, refused on every rank before any collective call."""
    if job.ranks.world == 1:
        return
    if resume:
        raise LowbitError("--resume is for one process; resume the compile without torchrun, or start it over")
    if job.recipe.needs_calibration and job.calib.samples < job.ranks.world:
        raise LowbitError(f"--calib-samples {job.calib.samples} is fewer than the {job.ranks.world} processes; give "
                          "each process at least one sample")
    if job.recipe.lkd is not None or lkd:
        raise LowbitError(f"recipe '{job.recipe.name}' distils (LKD), which runs in one process; start it without "
                          "torchrun")


def _follow(job: _Job, lkd, resume: bool, force: bool) -> Path:
    """A rank other than 0: the same checks and passes (its share of the calibration), no artifact. A streaming
    RTN compile has no pass before rank 0 writes, so nothing to do here."""
    artifact.check_output_dir(job.out, force)          # the same refusal as rank 0's, before any collective
    inputs = _read_inputs(job, lkd, None, 0, 0)
    loaded, graph, source_hash = _load_and_trace(job, inputs)
    if _passes_before_writing(job, graph):
        _quantize(job, inputs, loaded, graph, source_hash, resume)
    return job.out


def _passes_before_writing(job: _Job, traced) -> bool:
    """Whether passes run on the traced graph before the artifact is written: always in memory; when the compile
    streams, only a calibrated pass or LKD (RTN runs block by block as it writes)."""
    return traced.source is None or job.recipe.needs_calibration or job.recipe.lkd is not None


def _lead(job: _Job, lkd, eval_text, eval_windows: int, eval_seq_len: int, resume: bool, force: bool) -> Path:
    """Rank 0 (the only rank of a one-process compile): checks, passes, and the artifact."""
    out, lowering, options, quiet = job.out, job.lowering, job.options, job.quiet
    # The output path stays locked from here to the artifact's move into place: a second compile into it
    # fails at once instead of racing this one.
    with artifact.writing(out):
        artifact.check_output_dir(out, force)
        inputs = _read_inputs(job, lkd, eval_text, eval_windows, eval_seq_len)
        t0 = time.perf_counter()
        loaded, traced, source_hash = _load_and_trace(job, inputs)

        def fill(tmp: Path) -> dict:
            graph = traced if traced.source is None else _stream(job, loaded, traced, tmp)
            lowered = lowering.write(tmp, graph, loaded, job.recipe, options, job.timings, quiet)
            job.timings["total"] = round(time.perf_counter() - t0, 3)
            body = _manifest_body(job, loaded, source_hash, lowered)
            write_report(tmp / "report.md", body, graph)
            if job.budget_info is not None:          # the plan, as a recipe to edit and compile again
                (tmp / "plan.toml").write_text(to_toml(job.recipe), encoding="utf-8")
            return body

        if _passes_before_writing(job, traced):     # a failure keeps their checkpoint, for --resume
            _quantize(job, inputs, loaded, traced, source_hash, resume)
        path = artifact.write_artifact(out, fill, force=force)
        if job.checkpoint is not None:
            job.checkpoint.discard()
        return path


def _read_inputs(job: _Job, lkd, eval_text, eval_windows: int, eval_seq_len: int) -> _Inputs:
    """The model folder, the calibration / LKD / --eval texts tokenized into windows: every input checked before
    any progress output, so a bad one is one clean line."""
    from lowbit.metrics import read_text, windows

    recipe = job.recipe
    inputs = _Inputs(resolve_model_path(job.model))
    config = read_config(inputs.model_path)
    inputs.lkd = lkd_settings(recipe, lkd)
    if inputs.lkd is not None:
        # The recipe's own checks run on the settings this compile runs (--lkd-learn rounding on a GPTQ recipe is
        # refused here), and the manifest and a budget's plan.toml record them.
        job.recipe = replace(recipe, lkd=inputs.lkd)
    needs_text = recipe.needs_calibration or (inputs.lkd is not None and inputs.lkd.data == "calib")
    calib_text = read_text(job.calib.text, "calib") if needs_text else None
    if eval_text and task_of(config) != "causal-lm":
        raise LowbitError("--eval measures perplexity, which needs a causal LM; this model is an encoder (use "
                          "'lowbit eval ARTIFACT --embeddings TEXT' after compiling)")
    eval_body = read_text(eval_text, "eval") if eval_text else None
    if calib_text is None and eval_body is None:
        return inputs
    tokenizer = load_tokenizer(inputs.model_path)
    if tokenizer is None:
        raise LowbitError(f"'{inputs.model_path}' has no tokenizer; calibration and --eval need one to tokenize text")
    from lowbit.ir.calibration import calibration_windows

    context = max_positions(config)
    if calib_text is not None and recipe.needs_calibration:
        c = job.calib
        inputs.calib_ids = calibration_windows(tokenizer, calib_text, c.samples, c.seq_len, c.seed, context)
    if inputs.lkd is not None and inputs.lkd.data == "calib":
        o = inputs.lkd
        inputs.lkd_ids = calibration_windows(tokenizer, calib_text, o.samples, o.seq_len, o.seed, context)
    if eval_body is not None:
        if eval_seq_len > context:
            raise LowbitError(f"--eval-seq-len {eval_seq_len} is longer than the model's context of {context} tokens")
        inputs.eval_windows = windows(tokenizer, eval_body, eval_seq_len, eval_windows)
    return inputs


def _streams(job: _Job, inputs: _Inputs) -> bool:
    """Whether this compile runs block by block from the checkpoint (compiler/stream.py). Not yet: --eval (it runs
    the float model), LKD before GPTQ, activation-aware scaling, rotations and size budgets (they rewrite or
    measure the float graph before the weight pass), exports in transformers' layout, a quantized embedding,
    checkpoints not in safetensors or whose loading converts tensors (``_open``)."""
    recipe = job.recipe
    return (recipe.method in ("rtn", "gptq", "fp") and (inputs.lkd is None or recipe.method == "rtn")
            and not (recipe.awq or recipe.rotate or recipe.online_rotate or recipe.budget_bits)
            and inputs.eval_windows is None
            and getattr(job.lowering, "streams", False)
            and not recipe.scheme.quantize_embeddings and checkpoint_dtype(inputs.model_path) is not None)


def _open(job: _Job, inputs: _Inputs):
    """(loaded model, its CheckpointWeights): a weightless model with the config and tokenizer, read block by block
    later, when the compile streams; else the model in memory and None."""
    path = inputs.model_path
    if _streams(job, inputs):
        from lowbit.frontend.load import LoadedModel
        from lowbit.frontend.skeleton import weightless_model
        from lowbit.frontend.weights import CheckpointWeights

        config = read_config(path)
        weights, model = CheckpointWeights(path, job.precision), weightless_model(config)
        if weights.model_names(model) is not None:
            return LoadedModel(model, load_tokenizer(path), config, path, task_of(config)), weights
    return _load(job, path), None


def _load(job: _Job, path: Path):
    """The model in memory, its weights rounded to ``--dtype``."""
    loaded = load_model(str(path))
    round_weights(loaded.model, job.precision)
    return loaded


def _load_and_trace(job: _Job, inputs: _Inputs):
    """(loaded model, traced graph, source hash). Load and trace silently, then validate against the real layer
    shapes: a bad recipe for this model is still a single error line. Progress starts once the inputs are good."""
    from lowbit.compiler.stream import range_keys

    recipe = job.recipe
    with timed(job.timings, "load"):
        loaded, weights = _open(job, inputs)
        source_hash = hash_model_folder(loaded.path)
    with timed(job.timings, "trace"):
        # Streaming RTN runs the decode check with the compile (compiler/stream.py), in its one read of the
        # checkpoint; a calibrated method checks here, before the long pass.
        graph = trace(loaded, decode_check=weights is None or recipe.needs_calibration, weights=weights)
    if weights is not None and range_keys(graph) is None:        # blocks interleave: compile it in memory
        with timed(job.timings, "load"):
            loaded = _load(job, inputs.model_path)
        with timed(job.timings, "trace"):
            graph = trace(loaded)
    graph.storage_dtype = job.precision or checkpoint_dtype(loaded.path)
    check_groups(graph, recipe)
    if inputs.lkd is not None and not any(site.block for site, _ in quantizable(graph, recipe)):
        raise LowbitError(f"LKD needs quantized weights in the model's blocks; recipe '{recipe.name}' quantizes none")
    job.lowering.check(graph, recipe)
    if hasattr(job.lowering, "check_model"):          # what a target reads from the model itself (config, tokenizer)
        job.lowering.check_model(loaded)
    if recipe.rotate:
        find_plan(graph)                # refuses a model whose residual stream a rotation cannot pass
    if recipe.online_rotate:
        online_sites(graph, recipe)     # refuses a model with nothing to rotate
    if recipe.budget_bits:
        job.formats = candidates(graph, recipe, lambda r: job.lowering.check(graph, r))
        check_fits(graph, recipe, job.formats)
    say(f"loaded {job.model} in {job.timings['load']:.1f}s, traced in {job.timings['trace']:.1f}s: "
        f"{len(graph.sites)} quantizable matmuls in {len([b for b in graph.blocks if b])} blocks", job.quiet)
    return loaded, graph, source_hash


def _quantize(job: _Job, inputs: _Inputs, loaded, graph, source_hash: str, resume: bool) -> None:
    """Perplexity before, LKD, the quantization pass (with its resume checkpoint), perplexity after, the fusion
    rules: the graph rewritten in place, what each did recorded on ``job``."""
    from lowbit.metrics import perplexity
    from lowbit.passes.checkpoint import Checkpoint

    recipe, quiet, timings = job.recipe, job.quiet, job.timings
    if inputs.eval_windows is not None:
        with timed(timings, "eval_before", quiet, "perplexity before quantization"):
            job.metrics["ppl_before"] = perplexity(lambda ids: loaded.model(input_ids=ids, use_cache=False).logits,
                                                   inputs.eval_windows, show_progress=not quiet)
    fingerprint = {"source": source_hash, "dtype": job.precision and dtype_name(job.precision),
                   "recipe": recipe.to_dict()}
    if recipe.rotate:
        with timed(timings, "rotate", quiet, "rotations folded into the weights"):
            job.rotate_info = rotate_pass(graph)
    if recipe.online_rotate:
        with timed(timings, "online_rotate", quiet,
                   f"online rotations before {ONLINE_ROTATIONS[recipe.online_rotate]}"):
            job.online_info = online_pass(graph, recipe)
    if recipe.budget_bits:
        with timed(timings, "budget", quiet, f"formats planned within {recipe.budget_bits:g} bits per weight"):
            job.recipe, job.budget_info = plan(graph, recipe, inputs.calib_ids, job.formats, recipe.budget_bits,
                                               show_progress=not quiet)
        recipe = job.recipe
        job.lowering.check(graph, recipe)
        say(f"budget plan: {job.budget_info['bits_per_weight']:.3f} bits per weight, "
            + ", ".join(f"{n} {f}" for f, n in sorted(job.budget_info["formats"].items()))
            + f"; estimated perplexity {job.budget_info['estimated_ppl_ratio']:.3f}x float", quiet)
    if inputs.lkd is not None:      # after the plan: each layer distils in the format it will have
        job.lkd_info = _distil(job, inputs, loaded, graph, fingerprint, resume)
    if recipe.awq:         # every process measures all the windows itself: the scaling is not split yet
        with timed(timings, "awq", quiet, f"activation-aware scaling on {job.device}"):
            job.awq_info = awq_pass(graph, recipe, inputs.calib_ids, device=job.device, show_progress=not quiet,
                                    chunk=job.calib.chunk)
        say(f"activation-aware scaling: {len(job.awq_info['folds'])} sets of matmuls scaled"
            + "".join(f"; {n} inputs left unscaled: {why}" for why, n in job.awq_info["unscaled"].items()), quiet)
    if recipe.method in PASSES and (graph.source is None or recipe.needs_calibration):
        if recipe.method == "gptq" and job.ranks.main:
            job.checkpoint = Checkpoint(job.out, {**fingerprint, "calib": job.calib.to_dict()}, resume, quiet)
        ids = inputs.calib_ids
        where = job.device + (f", {job.ranks.world} processes" if job.ranks.world > 1 else "")
        with timed(timings, f"pass_{recipe.method}", quiet, f"{recipe.method} quantization on {where}"):
            job.pass_info = PASSES.get(recipe.method)(
                graph, recipe, calib_ids=None if ids is None else ids[job.ranks.share(len(ids))], device=job.device,
                show_progress=not quiet, checkpoint=job.checkpoint, chunk=job.calib.chunk, ranks=job.ranks)
        if ids is not None:
            job.pass_info.update(calib_tokens=int(ids.numel()), processes=job.ranks.world)
        for line in outlier_lines(graph):
            say(line, quiet)
    if inputs.eval_windows is not None:
        with timed(timings, "eval_after", quiet, "perplexity after quantization"):
            job.metrics["ppl_after"] = perplexity(lambda ids: graph(ids, torch.ones_like(ids)), inputs.eval_windows,
                                                  show_progress=not quiet)
        say(f"perplexity {job.metrics['ppl_before']['ppl']:.3f} -> {job.metrics['ppl_after']['ppl']:.3f}", quiet)
    if job.fuse and job.lowering.fuse and job.ranks.main and graph.source is None:
        from lowbit.rules import apply_rules

        with timed(timings, "fuse"):
            job.rules_info = apply_rules(graph)
        say("fusion rules: " + ", ".join(f"{k} fired {v['fired']}x" for k, v in job.rules_info.items()), quiet)


def _stream(job: _Job, loaded, graph, tmp: Path):
    """The streaming compile (compiler/stream.py): quantize, fuse and write ``graph`` block by block into ``tmp``;
    returns the graph to lower. A calibrated method's layers were made by its pass on ``graph`` and saved block by
    block (passes/checkpoint.py): a fresh trace of the model takes them from there."""
    from lowbit.compiler.stream import StreamCompile
    from lowbit.frontend.trace import decode_check_runs, decode_failure
    from lowbit.lowering.program import weight_writer
    from lowbit.passes.checkpoint import checkpoint_node
    from lowbit.passes.rtn import quantizable, rtn_node
    from lowbit.rules import CHECK_TOLERANCE, check_inputs, default_rules

    recipe, quiet = job.recipe, job.quiet
    fuse = job.fuse and job.lowering.fuse
    if recipe.needs_calibration:
        storage = graph.storage_dtype
        graph = trace(loaded, decode_check=False, weights=graph.source.weights)
        graph.storage_dtype = storage
    graph.writer, job.streamed = weight_writer(tmp), True
    layers = len(list(quantizable(graph, recipe))) if recipe.quantizes else 0
    rtn = rtn_node(graph, recipe) if layers else (lambda node: None)
    saved = job.checkpoint is not None            # the layers GPTQ or LKD made
    quantize = (checkpoint_node(graph, recipe, job.checkpoint, None if recipe.needs_calibration else rtn) if saved
                else rtn)
    decode = graph.kv is not None and not recipe.needs_calibration      # (else checked when traced)
    made = "calibrated" if recipe.needs_calibration else "distilled"
    what = (f"{f'writing the {made} layers' if saved else recipe.method + ' quantization'}"
            f"{' with fusion' if fuse else ''}, block by block on {job.device}")
    with timed(job.timings, "emit" if saved else f"pass_{recipe.method}", quiet, what):
        stream = StreamCompile(graph, graph.writer, check_inputs(graph), quantize, default_rules() if fuse else None,
                               CHECK_TOLERANCE, not quiet, decode_check_runs(graph) if decode else None)
        rules = stream.run()
    why = stream.decode_mismatch() if decode else None
    if why is not None:
        raise decode_failure(graph, loaded.config, why)
    if recipe.method in PASSES and not recipe.needs_calibration:
        job.pass_info = {"layers": layers}
        for line in outlier_lines(graph):
            say(line, quiet)
    if fuse:
        job.rules_info = rules
        say("fusion rules: " + ", ".join(f"{k} fired {v['fired']}x" for k, v in rules.items()), quiet)
    return graph


def _distil(job: _Job, inputs: _Inputs, loaded, graph, fingerprint: dict, resume: bool) -> dict:
    """Layer-by-layer distillation on the calibration windows, or on random tokens (``--lkd-data random``)."""
    from lowbit.passes.checkpoint import Checkpoint, DistillationChain
    from lowbit.passes.lkd import lkd_pass

    opts, ids = inputs.lkd, inputs.lkd_ids
    if ids is None:
        gen = torch.Generator().manual_seed(opts.seed)
        ids = torch.randint(0, loaded.config.vocab_size, (opts.samples, opts.seq_len), generator=gen)
    weights, on_block, chain = None, None, None
    if graph.source is not None:        # streaming: each block read, distilled, quantized and saved in turn
        calib = job.calib.to_dict() if opts.data == "calib" else None
        job.checkpoint = Checkpoint(job.out, {**fingerprint, "lkd": opts.to_dict(), "calib": calib}, resume,
                                    job.quiet)
        weights, on_block = _distilled_layers(job, loaded, graph)
        chain = DistillationChain(job.checkpoint)
    elif resume:
        say("--resume: LKD on a model held in memory (see docs/big-models.md) starts from the first block", job.quiet)
    with timed(job.timings, "lkd", job.quiet, f"layer-by-layer distillation, {opts.steps} steps per block"):
        info = lkd_pass(loaded.model, graph, job.recipe, ids, opts, show_progress=not job.quiet, weights=weights,
                        on_block=on_block, chain=chain)
    blocks = list(info["blocks"].values())
    before = sum(b["loss_before"] for b in blocks) / len(blocks)
    after = sum(min(b["loss_after"], b["loss_before"]) for b in blocks) / len(blocks)
    say(f"LKD ({opts.loss} loss): block loss reduced in {sum(b['kept'] for b in blocks)} of {len(blocks)} blocks; "
        f"mean {before:.4g} -> {after:.4g}", job.quiet)
    return info


def _distilled_layers(job: _Job, loaded, graph):
    """(ModuleWeights, on_block) for LKD in a streaming compile: each block's final float weights are quantized by
    the weight pass's own RTN at once and saved in ``job.checkpoint``, which the stream then writes."""
    from lowbit.frontend.weights import ModuleWeights
    from lowbit.passes.rtn import rtn_layer

    def on_block(layers):
        for site, spec, w, bias in layers:
            job.checkpoint.add(rtn_layer(graph, job.recipe, site, spec, w, bias))
        job.checkpoint.flush()
    return ModuleWeights(loaded.model, graph.source.weights), on_block


def _source_dtype(path: Path) -> Optional[str]:
    dtype = checkpoint_dtype(path)
    return None if dtype is None else dtype_name(dtype)


def _manifest_body(job: _Job, loaded, source_hash: str, lowered: dict) -> dict:
    """The manifest's entries for this compile (``format.artifact.write_artifact`` adds hashes and versions)."""
    body = {"target": job.target,
            "source": {"path": str(loaded.path.resolve()), "model_type": loaded.model_type,
                       "dtype": _source_dtype(loaded.path),
                       "architectures": list(getattr(loaded.config, "architectures", None) or []),
                       "task": loaded.task, "sha256": source_hash},
            "recipe": job.recipe.to_dict(), "timings": job.timings, "sizes": lowered.pop("sizes"),
            "metrics": job.metrics, "device": job.device, "streamed": job.streamed,
            "generation": {"max_positions": loaded.max_positions, "eos_token_ids": eos_token_ids(loaded.config)}}
    if job.rules_info is not None:
        body["rules"] = job.rules_info
    body.update(lowered)
    if job.lkd_info is not None:
        body["lkd"] = job.lkd_info
    if job.awq_info is not None:
        body["awq"] = job.awq_info
    if job.rotate_info is not None:
        body["rotate"] = job.rotate_info
    if job.online_info is not None:
        body["online_rotate"] = job.online_info
    if job.budget_info is not None:
        body["budget"] = job.budget_info
    if job.recipe.needs_calibration:
        body["calibration"] = {**job.calib.to_dict(), "tokens": job.pass_info.get("calib_tokens"),
                               "processes": job.pass_info.get("processes", 1),
                               "peak_activation_bytes": job.pass_info.get("peak_activation_bytes")}
    return body
