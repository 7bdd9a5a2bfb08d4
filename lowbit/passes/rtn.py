"""Round-to-nearest weight quantization: the baseline every other method is measured against.

Each selected matmul's weight is quantized independently by min/max (``passes.quantize``) and the matmul
is rewritten to ``lowbit::wna16_linear``. No calibration data is needed.
"""

from __future__ import annotations

import torch

from lowbit.compiler.ir import Graph, QuantizedLinear
from lowbit.compiler.progress import progress_bar
from lowbit.passes.quantize import dequantize_codes, pack_codes, quantize_weight


def quantizable(graph: Graph, recipe):
    """(site, spec) for every matmul the recipe quantizes, in graph order."""
    for site in graph.sites.values():
        spec = recipe.spec_for(site.name)
        # A module traced twice ("name#1") has no single module to rebuild in the runtime: keep it float.
        if spec is not None and "#" not in site.name:
            yield site, spec


def rtn_pass(graph: Graph, recipe, show_progress: bool = True) -> dict:
    todo = list(quantizable(graph, recipe))
    for site, spec in progress_bar(todo, desc="rtn", disable=not show_progress):
        w = graph.weight(site).float()
        q, scale, zero = quantize_weight(w, spec)
        group = spec.group(site.in_features)
        err = (dequantize_codes(q, scale, zero, group) - w).norm() / w.norm().clamp_min(1e-12)
        bias = graph.bias(site)
        graph.replace_with_quantized(site, QuantizedLinear(
            name=site.name, op="wna16_linear", spec=spec, in_features=site.in_features,
            out_features=site.out_features, group_size=group, qweight=pack_codes(q, spec.bits),
            scales=scale, zeros=zero, bias=None if bias is None else bias.clone(), method="rtn",
            stats={"weight_rel_err": round(float(err), 6)}))
    graph.finalize()
    return {"layers": len(todo)}
