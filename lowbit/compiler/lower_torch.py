"""Lowering for the native torch runtime: the quantized IR -> weights.safetensors + graph.json.

The runtime rebuilds the transformers architecture from config.json and swaps every layer listed in
graph.json for a module that calls the layer's ``lowbit::`` op, so the artifact stores tensors under the
transformers names: float tensors as they were, quantized layers as ``<layer>.qweight/.scales/.zeros``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.compiler.ir import Graph

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


def artifact_tensors(graph: Graph, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the runtime needs, by name, with tied (shared) tensors stored once."""
    replaced = {f"{name}.weight" for name in graph.quantized} | {f"{name}.bias" for name in graph.quantized}
    out: dict[str, torch.Tensor] = {}
    seen: set = set()
    for key, t in model.state_dict().items():
        if key in replaced:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:          # tied weights (lm_head <- embed_tokens): the runtime re-ties them
            continue
        seen.add(ptr)
        out[key] = t.detach().contiguous()
    for name, q in graph.quantized.items():
        for suffix, t in q.tensors().items():
            out[f"{name}.{suffix}"] = t.detach().contiguous()
    return out


def graph_description(graph: Graph) -> dict:
    return {"task": graph.task, "model_type": graph.model_type,
            "layers": {name: q.layout() for name, q in graph.quantized.items()}}


def write_torch_target(tmp: Path, graph: Graph, loaded) -> dict:
    """Write the torch target files into ``tmp``; returns size accounting for the manifest."""
    tensors = artifact_tensors(graph, loaded.model)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "lowbit"})
    (tmp / GRAPH_FILE).write_text(json.dumps(graph_description(graph), indent=1) + "\n")
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
    return size_report(graph, loaded.model, tmp / WEIGHTS_FILE)


def size_report(graph: Graph, model, weights_path: Path) -> dict:
    elem = next(model.parameters()).element_size()
    matmul_float = sum(s.in_features * s.out_features * elem for s in graph.sites.values())
    quantized_float = sum(q.in_features * q.out_features * elem for q in graph.quantized.values())
    quantized_bytes = sum(q.nbytes for q in graph.quantized.values())
    matmuls = [q for q in graph.quantized.values() if q.op.endswith("_linear")]
    matmul_after = matmul_float - sum(q.in_features * q.out_features * elem - q.nbytes for q in matmuls)
    seen, model_bytes = set(), 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            model_bytes += t.numel() * t.element_size()
    return {"source_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "model_bytes_before": model_bytes,
            "weights_file_bytes": weights_path.stat().st_size,
            "matmul_bytes_before": matmul_float,
            "matmul_bytes_after": matmul_after,
            "quantized_bytes_before": quantized_float, "quantized_bytes_after": quantized_bytes,
            "quantized_layers": len(graph.quantized), "quantized_matmuls": len(matmuls),
            "matmul_layers": len(graph.sites)}
