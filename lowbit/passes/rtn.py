"""Round-to-nearest weight quantization: the baseline every other method is measured against.

Each selected matmul's weight is quantized independently by min/max (``format.quantize``) and the matmul
is rewritten to ``lowbit::wna16_linear``. No calibration data is needed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from lowbit.ir.graph import Graph, QuantizedLayer
from lowbit.progress import progress_bar
from lowbit.format.quantize import (dequantize_codes, group_error_stats, pack_codes, quantize_codes,
                                    quantize_weight)


def quantizable(graph: Graph, recipe):
    """(site, spec) for every matmul the recipe quantizes, in graph order."""
    for site in graph.sites.values():
        spec = recipe.spec_for(site.name)
        # A module traced twice ("name#1") has no single module for the ONNX and hf-gptq lowerings, which swap
        # modules by name: keep it float.
        if spec is not None and "#" not in site.name:
            yield site, spec


def quantize_layer(name: str, op: str, w: torch.Tensor, spec, bias, method: str = "rtn",
                   mse: bool = False, qparams=None) -> QuantizedLayer:
    """RTN-quantize one weight w [N, K] into the stored layout, with its relative weight error. ``qparams``
    (scale, zero) fixes the grid instead of computing it from w; (scale, zero, codes) fixes the codes too (learnt
    rounding, which w, in its storage dtype, need not reproduce)."""
    w = w.float()
    if qparams is None:
        q, scale, zero = quantize_weight(w, spec, mse=mse)
    elif len(qparams) == 3:
        scale, zero, q = qparams
    else:
        scale, zero = qparams
        q = quantize_codes(w, scale, zero, spec)
    group = spec.group(w.shape[1])
    deq = dequantize_codes(q, scale, zero, group)
    err = (deq - w).norm() / w.norm().clamp_min(1e-12)
    return QuantizedLayer(name=name, op=op, spec=spec, in_features=w.shape[1], out_features=w.shape[0],
                          group_size=group, qweight=pack_codes(q, spec.bits), scales=scale, zeros=zero,
                          bias=None if bias is None else bias.clone(), method=method,
                          stats={"weight_rel_err": round(float(err), 6), **group_error_stats(w, deq, scale, group)})


def quantize_embedding(graph: Graph, recipe) -> tuple[Optional[QuantizedLayer], Optional[torch.Tensor]]:
    """RTN for the token embedding when the recipe asks (every method: a lookup has no Hessian): the layer and
    the float table it came from, or (None, None)."""
    emb = graph.embeddings.get(graph.input_embedding) if graph.input_embedding else None
    spec = recipe.spec_for(emb.name, embedding=True) if emb is not None else None
    if spec is None:
        return None, None
    w = graph.attr(emb.weight_attr).detach()
    layer = quantize_layer(emb.name, "wna16_embedding", w, spec, None, mse=recipe.scheme.mse)
    graph.replace_embedding(emb, layer)
    return layer, w


def tied_to(embedding: Optional[QuantizedLayer], table: Optional[torch.Tensor], name: str, op: str,
            w: torch.Tensor, spec, bias) -> Optional[QuantizedLayer]:
    """The lm_head tied to a quantized embedding (its weight is the embedding's float ``table``), quantized alike:
    a layer on the embedding's very tensors (RTN would compute the same codes), so the artifact stores the table
    once and ONNX shares it; else None."""
    if (embedding is None or bias is not None or op != "wna16_linear" or spec != embedding.spec
            or w.shape != table.shape or w.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()):
        return None
    return replace(embedding, name=name, op=op)


def rtn_layer(graph: Graph, recipe, site, spec, w: torch.Tensor, bias) -> QuantizedLayer:
    """The site's layer from its float weight w [N, K]: on the grid (or with the codes) LKD fixed for it
    (``graph.fixed_qparams``), or its own."""
    return quantize_layer(site.name, spec.linear_op, w, spec, bias, mse=recipe.scheme.mse,
                          qparams=graph.fixed_qparams.get(site.name))


def quantize_sites(graph: Graph, recipe, todo: list, emb=None, table=None, show_progress: bool = False):
    """RTN-quantize the (site, spec) pairs ``todo`` in place; ``emb``/``table``: a quantized embedding and its float
    table, which a tied lm_head shares."""
    for site, spec in progress_bar(todo, desc="rtn", disable=not show_progress):
        w, bias = graph.weight(site), graph.bias(site)
        layer = (None if site.name in graph.fixed_qparams
                 else tied_to(emb, table, site.name, spec.linear_op, w, spec, bias))
        graph.replace_with_quantized(site, layer or rtn_layer(graph, recipe, site, spec, w, bias))
        del w, bias            # the last references to a weightless graph's float weight, dropped by the swap


def rtn_pass(graph: Graph, recipe, show_progress: bool = True, **_) -> dict:
    todo = list(quantizable(graph, recipe))
    emb, table = quantize_embedding(graph, recipe)
    quantize_sites(graph, recipe, todo, emb, table, show_progress)
    graph.finalize()
    return {"layers": len(todo) + (emb is not None)}


def rtn_node(graph: Graph, recipe) -> Callable:
    """The streaming compile's RTN (compiler/stream.py): quantize a node when it is a matmul the recipe selects;
    returns the node that replaced it, or None."""
    todo = {site.node: (site, spec) for site, spec in quantizable(graph, recipe)}

    def quantize(node):
        if node not in todo:
            return None
        site, spec = todo.pop(node)
        quantize_sites(graph, recipe, [(site, spec)])
        return site.node
    return quantize
