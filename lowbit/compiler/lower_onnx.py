"""Lowering to ONNX for ONNX Runtime: the quantized model, with quantized layers as ONNX Runtime operators.

The ONNX target is the torch target plus ``onnx/model.onnx``: the loaded transformers model gets the
quantized layers swapped in as lowbit modules (the very packed tensors the shipped program holds), then
swapped for ``plugins.onnx`` forms, and ``torch.onnx.export(dynamo=True)`` translates the ``lowbit::ort_*``
ops. The fusion rules' rewrites of the shipped graph do not reach this export yet.

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
import warnings
from collections import Counter
from pathlib import Path

import torch

from lowbit.errors import LowbitError

ONNX_FILE = "onnx/model.onnx"
OPSET = 18
# Protobuf cannot hold a model over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "com.microsoft::MatMulNBits"}


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def check_accuracy_level(level: int):
    if level not in ACCURACY_LEVELS:
        raise LowbitError(f"--onnx-accuracy-level {level}: valid {', '.join(map(str, ACCURACY_LEVELS))} "
                          "(0: float math, exact; 4: int8 activations inside MatMulNBits, faster, less exact)")


def check_onnx_exportable(graph, recipe):
    """Before any pass runs: refuse layers whose quantized format has no ONNX Runtime operator."""
    from lowbit.passes.rtn import quantizable
    from lowbit.plugins.onnx.ort_ops import MIN_BLOCK, block_size_for, gather_block_ok

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


def export_onnx(model: torch.nn.Module, task: str, dest: Path, accuracy_level: int = 0) -> dict:
    """Export a transformers model with lowbit modules (``hf_modules.quantize_modules``) to ``dest``; returns the
    manifest's onnx entry."""
    from torch.export import Dim

    from lowbit.compiler.frontend import CausalStep, EncoderForward, kv_layout
    from lowbit.plugins.onnx import for_onnx, translations

    check_accuracy_level(accuracy_level)
    lowered = for_onnx(model, accuracy_level)
    batch, seq = Dim("batch"), Dim("sequence")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if task == "causal-lm":
        shapes = kv_layout(model)
        n = len(shapes)
        wrapper = CausalStep(model, n)
        b, s, p = 2, 3, 4
        ids = torch.randint(0, vocab, (b, s), generator=g)
        past = [torch.randn(b, h, p, dk if j == 0 else dv, generator=g) for h, dk, dv in shapes for j in range(2)]
        args = (ids, torch.ones(b, p + s, dtype=torch.long), torch.arange(p, p + s).expand(b, s), past)
        past_len, total = Dim("past_sequence"), Dim("total_sequence")
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                   "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len}] * (2 * n)}
        inputs, outputs = io_names(n)
        kv = {"layers": n, "kv_heads": [h for h, _, _ in shapes], "head_dim": [dk for _, dk, _ in shapes],
              "value_dim": [dv for _, _, dv in shapes]}
    else:
        wrapper = EncoderForward(model)
        ids = torch.randint(0, vocab, (2, 5), generator=g)
        args = (ids, torch.ones_like(ids))
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        inputs, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
        kv = None
    t0 = time.perf_counter()
    # torch.onnx prints its own step-by-step log; lowbit reports the export as one timed step instead.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper.eval(), args, dynamic_shapes=dynamic, input_names=inputs,
                                    output_names=outputs, dynamo=True, optimize=True, opset_version=OPSET,
                                    custom_translation_table=translations(), verbose=False)
    export_s = time.perf_counter() - t0
    dest.parent.mkdir(parents=True, exist_ok=True)
    initializer_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                            if v.const_value is not None)
    external = initializer_bytes > EXTERNAL_DATA_BYTES
    program.save(str(dest), external_data=external)
    return {"file": str(dest.name), "opset": OPSET, "export_seconds": round(export_s, 2),
            "external_data": external, "accuracy_level": accuracy_level, "inputs": inputs, "outputs": outputs,
            "kv_cache": kv, "lowered_modules": lowered, **check_and_describe(dest)}


def op_name(node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def check_and_describe(path: Path) -> dict:
    """Run onnx's full checker on the saved model and prove its integer matmuls exact on every CPU; its op
    histogram, matmul weight bytes and integer matmul forms."""
    import onnx
    from onnx import numpy_helper

    from lowbit.plugins.onnx.integer_matmul import check_integer_matmuls

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise LowbitError(f"the exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from None
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


def write_onnx_target(tmp: Path, graph, loaded, accuracy_level: int = 0) -> dict:
    """Add ``onnx/model.onnx`` to a staged torch-target artifact in ``tmp`` (``loaded.model`` gets the quantized
    layers of ``graph`` swapped in)."""
    from lowbit.compiler.hf_modules import quantize_modules

    model = quantize_modules(loaded.model.float(), graph)
    info = export_onnx(model, loaded.task, tmp / ONNX_FILE, accuracy_level)
    (tmp / "onnx" / "io.json").write_text(json.dumps({k: info[k] for k in ("inputs", "outputs", "kv_cache")},
                                                    indent=1) + "\n")
    return info
