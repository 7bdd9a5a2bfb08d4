"""Lowering to ONNX for ONNX Runtime: the shipped program, with its lowbit ops as ONNX Runtime operators.

The ONNX target is the torch target plus ``onnx/model.onnx``, lowered from the very program the artifact
ships (``program.json`` + ``weights.safetensors``), so the fusion rules' rewrites carry over: merged
Q/K/V and gate/up matmuls become one ``MatMulNBits`` each, a fused norm + INT8 quantize feeds its matmul
the codes. Each quantized op is rewritten into a ``lowbit::ort_*`` op on tensors repacked once into the
ONNX Runtime layout (``lowering.onnx.ort_ops``), and the rewritten program is written as ONNX by lowbit's own
emitter (``lowering.onnx.fx_onnx``; ``torch.onnx.export(dynamo=True)`` when it meets an op it does not know, or on
request), ``lowering.onnx.translations`` turning the lowbit ops into nodes either way.

A causal LM becomes one graph for prefill and decode::

    inputs:  input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
             past_key_values.{i}.key / .value [B, H_kv, P, D] (P = 0 for prefill)
    outputs: logits [B, S, V], present.{i}.key / .value [B, H_kv, P+S, D]

an encoder ``input_ids, attention_mask -> last_hidden_state``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from lowbit.frontend.load import eos_token_ids
from lowbit.frontend.trace import example_encoder_input, example_step, exporting
from lowbit.lowering.deferred import Deferred, deferred_call, materialized
from lowbit.lowering.onnx.genai_config import write_genai_config
from lowbit.errors import LowbitError
from lowbit.format.artifact import ONNX_FILE, ONNX_IO_FILE
from lowbit.lowering.onnx.options import OnnxOptions

OPSET = 18
# Initializers beyond this go to external data, written tensor by tensor: protobuf cannot hold a model over 2 GiB,
# and an embedded model is serialized whole in memory.
EXTERNAL_DATA_BYTES = 512 * 1024 ** 2
MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "com.microsoft::MatMulNBits"}


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def program_io(program: dict) -> tuple[list[str], list[str], dict | None]:
    """A program's ONNX input and output names and, for a causal LM, its KV cache's description (the manifest's
    ``kv_cache``: layers, heads, key and value widths)."""
    if program["task"] != "causal-lm":
        return ["input_ids", "attention_mask"], ["last_hidden_state"], None
    kv = program["kv"]
    inputs, outputs = io_names(len(kv))
    return inputs, outputs, {"layers": len(kv), "kv_heads": [h for h, _, _ in kv],
                             "head_dim": [dk for _, dk, _ in kv], "value_dim": [dv for _, _, dv in kv]}


def save_onnx(model, dest: Path) -> bool:
    """Save an ``onnx_ir`` model at ``dest``, its initializers in ``<dest>.data`` when the file would pass
    protobuf's 2 GiB limit; whether they went there."""
    import onnx_ir as ir

    dest.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = nbytes > EXTERNAL_DATA_BYTES
    ir.save(model, str(dest), external_data=f"{dest.name}.data" if external else None)
    return external


def run_checker(path: Path, what: str) -> None:
    """onnx's full checker on a saved model; a failure is one line naming ``what`` model failed."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise LowbitError(f"the {what} fails onnx.checker: {str(e).splitlines()[0]}") from None


def check_onnx_exportable(graph, recipe):
    """Before any pass runs: refuse layers whose quantized format has no ONNX Runtime operator."""
    from lowbit.passes.rtn import quantizable
    from lowbit.lowering.onnx.ort_ops import MIN_BLOCK, block_size_for, gather_block_ok

    for site, spec in quantizable(graph, recipe):
        group = spec.group(site.in_features)
        if not spec.act_bits and block_size_for(group, site.in_features) is None:
            raise LowbitError(f"target onnx: layer {site.name} has group size {group}, but MatMulNBits needs "
                              f"power-of-two blocks >= {MIN_BLOCK}; use a group of 16, 32, 64, 128, ... or "
                              "per-channel")
    emb = graph.embeddings.get(graph.input_embedding) if graph.input_embedding else None
    spec = recipe.spec_for(emb.name, embedding=True) if emb is not None else None
    if spec is not None:
        group = spec.group(emb.dim)
        if not gather_block_ok(group, emb.dim):
            raise LowbitError(f"target onnx: the quantized embedding's group size {group} must be a power of two "
                              f">= {MIN_BLOCK} dividing its size {emb.dim}; change group_size or set "
                              "quantize_embeddings = false")


def lower_program(gm: torch.fx.GraphModule, accuracy_level: int = 0) -> dict:
    """Rewrite ``gm``'s quantized ops into their ``lowbit::ort_*`` forms in place (the tensors repacked once into
    ONNX Runtime's layouts); returns how many of each op it wrote."""
    from lowbit.lowering.onnx.ort_ops import to_gather_nbits, to_matmul_a8, to_matmul_nbits

    L = torch.ops.lowbit
    counts: Counter = Counter()

    def tensor(node):
        return getattr(gm, node.target)

    def small(node):                    # scales and zero points: read now, the repacks' choices depend on them
        return materialized(tensor(node))

    def constant(base: str, suffix: str, t):
        if t is None:                   # an optional input left out (symmetric zero points)
            return None
        name = f"{base}_{suffix}"
        if isinstance(t, Deferred):
            setattr(gm, name, t)
        else:
            gm.register_buffer(name, t)
        # At the top of the graph, so a node anywhere may read it (a tied embedding reads the lm_head's).
        with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
            return gm.graph.get_attr(name)

    def replace(node, target, args):
        # A residual epilogue (rule residual_add) becomes an Add after the ONNX Runtime matmul.
        residual = node.kwargs.get("residual")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(target, args)
            out = new if residual is None else gm.graph.call_function(torch.ops.aten.add.Tensor, (new, residual))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        counts[target._opname] += 1

    nbits = {}          # packed weight -> its MatMulNBits tensors and their nodes, for a tied embedding to share
    # Embeddings last: a tied lm_head quantized alike reads the very same packed tensors (format.program stores them
    # once), and GatherBlockQuantized then reads the head's MatMulNBits initializers through reshapes.
    order = sorted((n for n in gm.graph.nodes if n.op == "call_function"),
                   key=lambda n: n.target == L.wna16_embedding.default)
    for node in order:
        if node.target == L.wna16_linear.default:
            x, qw, s, z, bias, bits, group, k = node.args
            n = tensor(qw).shape[0]
            t = deferred_call(to_matmul_nbits, (tensor(qw), small(s), small(z), bits, group, k))
            with gm.graph.inserting_before(node):
                packed = [constant(qw.target, key, t[key]) for key in ("b", "scales", "zero_points")]
            nbits[(qw.target, s.target, z.target)] = (t, packed)
            replace(node, L.ort_matmul_nbits.default, (x, *packed, bias, k, n, t["bits"], t["block_size"],
                                                       accuracy_level))
        elif node.target in (L.w8a8_linear.default, L.w8a8_linear_codes.default):
            codes = node.target == L.w8a8_linear_codes.default
            lead, (qw, s, z, bias, bits, group, k) = node.args[:1 + codes], node.args[1 + codes:8 + codes]
            n = tensor(qw).shape[0]
            t = deferred_call(to_matmul_a8, (tensor(qw), small(s), small(z), bits, group, k), (False, True, True))
            with gm.graph.inserting_before(node):
                w, scales = constant(qw.target, "w", t["w"]), constant(qw.target, "a8_scales", t["scales"])
            tail = (bias, k, n, group, t["w_zero"])
            if codes:
                replace(node, L.ort_matmul_a8_codes.default, (*lead, w, scales, *tail, node.args[-1]))
            else:
                replace(node, L.ort_matmul_a8.default, (*lead, w, scales, *tail))
        elif node.target == L.wna16_embedding.default:
            ids, qw, s, z, bits, group, dim, _ = node.args
            t = deferred_call(to_gather_nbits, (tensor(qw), small(s), small(z), bits, group, dim))
            with gm.graph.inserting_before(node):
                packed = _shared(gm, t, nbits.get((qw.target, s.target, z.target)))
                if packed:
                    counts["shared_embedding_head"] += 1
                else:
                    packed = [constant(qw.target, key, t[key]) for key in ("data", "scales", "zero_points")]
            replace(node, L.ort_gather_nbits.default, (ids, *packed, t["bits"], t["block_size"], dim))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [*dict(gm.named_buffers()), *(k for k, v in vars(gm).items() if isinstance(v, Deferred))]:
        if name not in read:
            delattr(gm, name)
    gm.recompile()
    return dict(counts)


def _shared(gm, gather: dict, matmul) -> list:
    """GatherBlockQuantized's data, scales and zero points as reshapes of a MatMulNBits' initializers holding the
    same bytes (a tied embedding and lm_head), or [] when there is no such matmul or the bytes differ."""
    if matmul is None:
        return []
    t, nodes = matmul
    pairs = list(zip((gather["data"], gather["scales"], gather["zero_points"]), (t["b"], t["scales"],
                                                                                 t["zero_points"]), nodes))
    if any((g is None) != (m is None) or g is not None and (g.dtype != m.dtype or g.numel() != m.numel() or
                                                              not torch.equal(materialized(g).reshape(-1),
                                                                              materialized(m).reshape(-1)))
           for g, m, _ in pairs):
        return []
    return [None if g is None else gm.graph.call_function(torch.ops.aten.reshape.default, (node, list(g.shape)))
            for g, _, node in pairs]


def example_inputs(program: dict, vocab: int, sizes: tuple = (2, 3, 4)) -> tuple[tuple, dict]:
    """Example arguments of a program (by default the trace's own, ``frontend.example_step``: batch, new tokens,
    cached tokens) and every dimension dynamic, named: ``{input: {axis: name}}``."""
    names = program["inputs"]
    if program["task"] != "causal-lm":
        ids = example_encoder_input(vocab, sizes[1] + 2, batch=sizes[0])
        return (ids, torch.ones_like(ids)), {n: {0: "batch", 1: "sequence"} for n in names}
    ids, mask, positions, past = example_step(program["kv"], vocab, sizes=sizes)
    step = {0: "batch", 1: "sequence"}
    return (ids, mask, positions, *past), {names[0]: step, names[1]: {0: "batch", 1: "total_sequence"},
                                           names[2]: step, **{n: {0: "batch", 2: "past_sequence"} for n in names[3:]}}


def _torch_dynamic(dims: dict) -> dict:
    from torch.export import Dim

    return {n: {axis: Dim.DYNAMIC for axis in axes} for n, axes in dims.items()}


def optimize_onnx(model, rewrite: bool = True) -> None:
    """onnxscript's optimizations on the exported ONNX IR, in place, ordered for speed: twice, constants folded,
    dead nodes removed, constants lifted to initializers and common subexpressions merged, then (``rewrite``)
    onnxscript's default rewrite rules, which clean up torchlib's output (no-op casts, reshapes, slices) and take
    most of the time; lowbit's own emitter writes none of those. ``torch.onnx.export(optimize=True)`` runs the
    same passes with the rewriter matching over the graph before folding, slower still."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer, rewriter

    common.InlinePass()(model)
    tidy = ir.passes.Sequential(common.RemoveUnusedNodesPass(),
                                common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                                common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                                common.CommonSubexpressionEliminationPass())
    for _ in range(2 if rewrite else 1):
        optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        tidy(model)
        if rewrite:
            rewriter.rewrite(model)
    ir.passes.Sequential(common.RemoveUnusedNodesPass(), common.OutputFixPass(), common.NameFixPass())(model)


def export_onnx(gm: torch.fx.GraphModule, program: dict, vocab: int, dest: Path, fusions: bool = True,
                attention_positions: int | None = None, exporter: str = "lowbit") -> dict:
    """Export a lowered program (``lower_program``) to ``dest``, with ONNX Runtime's fused operators unless
    ``fusions`` is false; returns the manifest's onnx entry, less the lowering's own fields.
    ``attention_positions``: the model's maximum positions when its attention mask is plain causal + padding
    (``ort_attention.plain_causal``), so its attention may become GroupQueryAttention; None keeps it plain."""
    from lowbit.lowering.onnx.fx_onnx import Unsupported, to_onnx
    from lowbit.lowering.onnx.onnx_fusions import fuse_for_ort

    args, dims = example_inputs(program, vocab)
    inputs, outputs, kv_info = program_io(program)
    t0 = time.perf_counter()
    model, used, note = None, exporter, None
    if exporter == "lowbit":
        try:
            runs = [args] + [example_inputs(program, vocab, sizes)[0] for sizes in ((3, 5, 7), (5, 4, 9))]
            model = to_onnx(gm, runs, inputs, [dims[n] for n in program["inputs"]], outputs, OPSET)
        except Unsupported as e:
            used, note = "torch.onnx", f"lowbit's emitter does not translate it: {e}"
    if model is None:
        model = _torch_onnx_export(gm, args, _torch_dynamic(dims), inputs, outputs)
    with exporting():
        optimize_onnx(model, rewrite=used == "torch.onnx")
        attention = ({"kv_heads": kv_info["kv_heads"], "max_positions": attention_positions}
                     if kv_info and attention_positions else None)
        fused, missed = fuse_for_ort(model, attention) if fusions else ({}, {})
        if fusions and kv_info and attention is None:
            missed["GroupQueryAttention"] = ("the model's attention mask is more than causal + padding (a sliding "
                                             "window or chunked attention)")
    export_s = time.perf_counter() - t0
    inv_freq = model.graph.meta.get("gqa_inv_freq") if fused.get("GroupQueryAttention") else None
    rotary = {"slot_rotary": [float(f) for f in inv_freq]} if inv_freq is not None else {}
    external = save_onnx(model, dest)
    return {"file": str(dest.name), "opset": OPSET, "exporter": used, **({"exporter_note": note} if note else {}),
            "export_seconds": round(export_s, 2), "external_data": external, "inputs": inputs, "outputs": outputs,
            "kv_cache": kv_info, "fusions": fused, **({"fusions_missed": missed} if missed else {}), **rotary,
            **check_and_describe(dest)}


def _torch_onnx_export(gm, args, dynamic: dict, inputs: list[str], outputs: list[str]):
    """``torch.onnx.export`` of the program (torch.export, its decompositions, torchlib): the ``onnx_ir`` model."""
    from lowbit.lowering.onnx.translations import translations

    # torch.onnx prints its own step-by-step log; lowbit reports the export as one timed step instead.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), exporting():
            ep = torch.export.export(gm, args, dynamic_shapes=dynamic, strict=False)
            return torch.onnx.export(ep, input_names=inputs, output_names=outputs, dynamo=True, optimize=False,
                                     opset_version=OPSET, custom_translation_table=translations(),
                                     verbose=False).model
    finally:
        onnx_log.setLevel(level)


def op_name(node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def check_and_describe(path: Path) -> dict:
    """Run onnx's full checker on the saved model and prove its integer matmuls exact on every CPU; its op
    histogram, matmul weight bytes and integer matmul forms."""
    import onnx
    from onnx import numpy_helper

    from lowbit.lowering.onnx.integer_matmul import check_integer_matmuls

    run_checker(path, "exported ONNX model")
    model = onnx.load(str(path), load_external_data=False)
    integer_matmuls = check_integer_matmuls(model, str(path.parent))
    sizes = {}
    for init in model.graph.initializer:
        sizes[init.name] = (numpy_helper.to_array(init).nbytes if not init.external_data
                            else int(next(e.value for e in init.external_data if e.key == "length")))
    ops = Counter(op_name(n) for n in model.graph.node)
    # A weight may reach its matmul through a layout op (the tied lm_head through a Transpose).
    for n in model.graph.node:
        if n.op_type in ("Transpose", "Cast", "Identity", "Reshape") and n.input and n.input[0] in sizes:
            sizes[n.output[0]] = sizes[n.input[0]]
    matmul_bytes = Counter()
    for n in model.graph.node:
        if op_name(n) in MATMUL_OPS:
            matmul_bytes[op_name(n)] += sum(sizes.get(i, 0) for i in n.input)
    return {"bytes": sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "matmul_weight_bytes": dict(matmul_bytes), "integer_matmuls": integer_matmuls}


def write_onnx_target(tmp: Path, vocab: int, accuracy_level: int = 0, fusions: bool = True,
                      attention_positions: int | None = None, exporter: str = "lowbit") -> dict:
    """Add ``onnx/model.onnx`` to a staged torch-target artifact in ``tmp``, lowered from its program
    (``attention_positions``: see ``export_onnx``)."""
    from lowbit.lowering.program import staged_program

    OnnxOptions(accuracy_level, fusions, exporter)          # the ranges, for direct callers
    program, gm = staged_program(tmp, torch.float32, defer=True, narrow_lookups=True)
    lowered = lower_program(gm, accuracy_level)
    info = export_onnx(gm, program, vocab, tmp / ONNX_FILE, fusions, attention_positions, exporter)
    (tmp / ONNX_IO_FILE).write_text(json.dumps({k: info[k] for k in ("inputs", "outputs", "kv_cache")},
                                                    indent=1) + "\n")
    return {**info, "accuracy_level": accuracy_level, "lowered_ops": lowered}


class OnnxLowering:
    """The ``onnx`` target (``lowbit.targets``): the torch target, then its program lowered to ONNX.
    Its options: ``OnnxOptions`` (``options.py``)."""
    fuse = True
    streams = True           # compiles block by block from the checkpoint (compiler/stream.py)

    def prepare(self, recipe, options: OnnxOptions):
        return recipe

    def check(self, graph, recipe):
        check_onnx_exportable(graph, recipe)

    def write(self, tmp: Path, graph, loaded, recipe, options: OnnxOptions, timings: dict, quiet: bool) -> dict:
        from lowbit.lowering.program import LOWERING as TORCH
        from lowbit.progress import say, timed

        from lowbit.lowering.onnx.ort_attention import plain_causal

        body = TORCH.write(tmp, graph, loaded, recipe, options, timings, quiet)
        positions = loaded.max_positions if graph.task == "causal-lm" and plain_causal(loaded.config) else None
        with timed(timings, "export_onnx", quiet, f"exporting ONNX ({options.exporter})"):
            info = write_onnx_target(tmp, graph.vocab_size, options.accuracy_level, options.fusions, positions,
                                     options.exporter)
        if graph.task == "causal-lm":
            kv = info["kv_cache"]
            info["genai"] = write_genai_config(tmp, loaded.config, list(zip(kv["kv_heads"], kv["head_dim"],
                                                                            kv["value_dim"])),
                                               ONNX_FILE, info["inputs"], loaded.max_positions,
                                               eos_token_ids(loaded.config),
                                               info["fusions"].get("GroupQueryAttention") == kv["layers"])
        if info.get("exporter_note"):
            say(f"ONNX written by torch.onnx: {info['exporter_note']}", quiet)
        say(f"ONNX model: {info['bytes'] / 2**20:.1f} MiB, ops " + ", ".join(
            f"{k} x{v}" for k, v in list(info["ops"].items())[:6]) + ", ...", quiet)
        return {**body, "onnx": info}


LOWERING = OnnxLowering()
