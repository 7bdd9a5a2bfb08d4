"""Lowering for the native torch runtime: the quantized IR itself -> program.json + weights.safetensors.

The artifact ships the traced, quantized graph (``format.program``): the torch runtime runs it as it is.
Tensors are stored under transformers' module names: float tensors as they were, quantized layers as
``<layer>.qweight/.scales/.zeros``. ``graph.json`` describes each quantized layer (for ``lowbit inspect``,
the report and the ONNX lowering).
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import torch

from lowbit.device import dtype_name
from lowbit.ir.graph import Graph
from lowbit.progress import timed
from lowbit.format import program as program_format
from lowbit.format.artifact import GRAPH_FILE, PROGRAM_FILE
from lowbit.format.safetensors_file import DTYPES
from lowbit.format.shards import ShardWriter, load_weights, read_weight, weight_entries, weight_files
from lowbit.lowering import deferred



def artifact_tensors(graph: Graph, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the transformers model by transformers name, as the graph holds it now (the passes' folds:
    AWQ's scaled norms, a rotated embedding), its quantized layers packed, tied (shared) tensors once unless a pass
    gave a user its own copy (a rotated head: see ``untied_head``): what a transformers-layout checkpoint holds."""
    replaced = {f"{name}.weight" for name in graph.quantized} | {f"{name}.bias" for name in graph.quantized}
    held = {name: attr for attr, name in graph.stored_names().items()}
    out: dict[str, torch.Tensor] = {}
    seen: set = set()
    for key, t in model.state_dict().items():
        if key in replaced:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:          # tied weights (lm_head <- embed_tokens): the runtime re-ties them
            continue
        seen.add(ptr)
        out[key] = (graph.attr(held[key]) if key in held else t).detach().contiguous()
    for attr, key in graph.tensor_names.items():
        if key not in out and key not in replaced and key.rpartition(".")[0] not in graph.quantized:
            out[key] = graph.attr(attr).detach().contiguous()
    for name, q in graph.quantized.items():
        for suffix, t in q.tensors().items():
            out[f"{name}.{suffix}"] = t.detach().contiguous()
    return out


def untied_head(graph: Graph, config) -> bool:
    """Whether a model that ties its head to the embedding has a head of its own in the graph (the rotation gives
    it ``W diag(g) Q`` while the table becomes ``E Q``): a checkpoint of it must not tie them."""
    head, table = graph.sites.get("lm_head"), graph.embeddings.get(graph.input_embedding)
    return (bool(getattr(config, "tie_word_embeddings", False)) and head is not None and table is not None
            and head.weight_attr != table.weight_attr)


def graph_description(graph: Graph) -> dict:
    return {"task": graph.task, "model_type": graph.model_type,
            "layers": {name: q.layout() for name, q in graph.quantized.items()}}


def program(graph: Graph) -> tuple[dict, dict[str, torch.Tensor]]:
    """The shipped program document and its tensors (those not yet written: ``graph.written``)."""
    doc, tensors = program_format.encode(graph.gm, graph.dtype, graph.stored_names(), storage=graph.storage_dtype,
                                         written=graph.written)
    doc.update({"task": graph.task, "model_type": graph.model_type,
                "inputs": [n["name"] for n in doc["nodes"] if n["op"] == "placeholder"]})
    if graph.kv is not None:
        doc["kv"] = [list(layer) for layer in graph.kv]
    return doc, tensors


def staged_program(tmp: Path, dtype: torch.dtype, defer: bool = False,
                   narrow_lookups: bool = False, keep_precision: bool = False) -> tuple[dict, torch.fx.GraphModule]:
    """(document, GraphModule in ``dtype``) of the program a staged artifact in ``tmp`` holds: what the ONNX and
    TensorRT lowerings read, so they lower exactly what the torch runtime runs. ``defer``: the module's tensors of
    ``deferred.DEFER_BYTES`` or more are ``lowering.deferred.Deferred`` attributes, read from the weight files
    when they are used, not now. ``narrow_lookups``: a vocabulary table stored narrower than ``dtype`` and only
    looked up stays narrow, its rows converted after the lookup (``format.program.decode(narrow_tables=True)``).
    ``keep_precision``: in a narrower ``dtype``, the model's float32 upcasts stay (``format.program.keep_upcasts``)."""
    doc = json.loads((tmp / PROGRAM_FILE).read_text())
    files = weight_files(p.name for p in tmp.iterdir())
    if not defer:
        return doc, program_format.decode(doc, load_weights(tmp, files, "staged artifact"), dtype=dtype,
                                          narrow_tables=narrow_lookups, narrow_heads=False,
                                          keep_precision=keep_precision)
    stored = weight_entries(tmp, files, "staged artifact")
    gm = program_format.decode(doc, {k: torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta")
                                    for k, (_, e) in stored.items()}, device="meta", dtype=dtype,
                               narrow_tables=narrow_lookups, narrow_heads=False, keep_precision=keep_precision)
    cpu = torch.device("cpu")
    for node in gm.graph.nodes:                  # device arguments back on the CPU: only the tensors were meta
        node.args, node.kwargs = torch.fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: cpu if isinstance(a, torch.device) else a)
    for attr, key in gm.meta["tensor_keys"].items():
        meta = getattr(gm, attr)
        later = deferred.Deferred(meta.shape, meta.dtype, partial(read_weight, *stored[key]))
        delattr(gm, attr)
        big = meta.numel() * meta.element_size() >= deferred.DEFER_BYTES
        setattr(gm, attr, later if big else later.materialize())
    gm.recompile()
    return doc, gm


def weight_writer(tmp: Path) -> ShardWriter:
    """Where the artifact's weights go: the streaming compile writes each block's as it finishes."""
    return ShardWriter(tmp, metadata={"format": program_format.FORMAT})


def write_layers(tmp: Path, graph: Graph) -> None:
    """``graph.json``: each quantized layer's format and statistics (``lowbit inspect``, the report)."""
    (tmp / GRAPH_FILE).write_text(json.dumps(graph_description(graph), indent=1) + "\n")


def write_torch_target(tmp: Path, graph: Graph, loaded) -> dict:
    """Write the torch target files into ``tmp`` (the weights through ``graph.writer`` when a streaming compile
    wrote some already); returns size accounting for the manifest."""
    doc, tensors = program(graph)
    writer = graph.writer or weight_writer(tmp)
    for key, t in tensors.items():
        writer.add(key, t)
    files = writer.close()
    (tmp / PROGRAM_FILE).write_text(json.dumps(doc) + "\n")
    write_layers(tmp, graph)
    loaded.config.save_pretrained(tmp)
    src_tok = [f for f in loaded.path.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                                        "merges", "added_tokens"))]
    if loaded.tokenizer is not None:
        (tmp / "tokenizer").mkdir()
        loaded.tokenizer.save_pretrained(tmp / "tokenizer")
    elif src_tok:
        (tmp / "tokenizer").mkdir()
        for f in src_tok:
            shutil.copy2(f, tmp / "tokenizer" / f.name)
    return size_report(graph, loaded.model, sum((tmp / f).stat().st_size for f in files))


def size_report(graph: Graph, model, weights_bytes: int) -> dict:
    elem = next(model.parameters()).element_size()
    matmul_float = sum(s.in_features * s.out_features * elem for s in graph.sites.values())
    quantized_float = sum(q.in_features * q.out_features * elem for q in graph.quantized.values())
    quantized_bytes = sum(q.nbytes for q in graph.quantized.values())
    matmuls = [q for q in graph.quantized.values() if q.op.endswith("_linear")]
    matmul_after = matmul_float - sum(q.in_features * q.out_features * elem - q.nbytes for q in matmuls)
    seen, model_bytes = set(), 0
    for t in model.state_dict(keep_vars=True).values():        # tied tensors are one object
        if id(t) not in seen:
            seen.add(id(t))
            model_bytes += t.numel() * t.element_size()
    return {"stored_dtype": dtype_name(graph.storage_dtype or next(model.parameters()).dtype),
            "model_bytes_before": model_bytes,
            "weights_file_bytes": weights_bytes,
            "matmul_bytes_before": matmul_float,
            "matmul_bytes_after": matmul_after,
            "quantized_bytes_before": quantized_float, "quantized_bytes_after": quantized_bytes,
            "quantized_layers": len(graph.quantized), "quantized_matmuls": len(matmuls),
            "matmul_layers": len(graph.sites)}


class TorchLowering:
    """The ``torch`` target (``lowbit.targets``)."""
    fuse = True
    streams = True           # compiles block by block from the checkpoint (compiler/stream.py)

    def prepare(self, recipe, options=None):
        return recipe

    def check(self, graph: Graph, recipe):
        pass

    def write(self, tmp: Path, graph: Graph, loaded, recipe, options, timings: dict, quiet: bool) -> dict:
        with timed(timings, "write", quiet, "writing the program and its weights"):
            return {"sizes": write_torch_target(tmp, graph, loaded)}


LOWERING = TorchLowering()
