"""Activation-aware weight scaling (AWQ, Lin et al. 2023) as an exact rewrite of the float graph.

A matmul's input channels are not equally important: the few that carry large activations dominate its output
error. For each set of matmuls that read one input (Q/K/V, gate/up, a down projection), a per-input-channel scale s
multiplies the weight columns and divides the input, ``y = (W diag s)(x / s) = W x``: exact in float. The division
folds into the op that makes x: an RMSNorm's weight (Gemma's ``1 + w`` too) or a LayerNorm's weight and bias; for
the down projection of a gated MLP (``act(gate) * up``), the up projection's rows (and bias); for the attention
output projection, the value projection's rows (attention is linear in the values; the query heads that share a
value head share its scales). Quantizing
``W diag s`` then puts the important columns on a finer grid relative to their size.

``s = m^alpha`` (normalized to a geometric mean of 1 between its extremes), ``m`` the channel's RMS over the
calibration tokens, read off the Hessian diagonal GPTQ also uses (``H = 2/n X^T X``). ``alpha`` on a grid from 0 (no
scaling: the plain quantizer) to 1 minimizes the set's output error on the calibration inputs, summed over its
matmuls: ``tr(D H D^T)`` with ``D = W - Q(W diag s) / s`` and Q round-to-nearest on the layer's scheme. Statistics
come from the float model (no layer is quantized while they are gathered); the weight pass (RTN or GPTQ) then
quantizes the scaled graph, GPTQ on its own calibration of it. Where x comes from anything else (a GELU, values
sliced from a fused Q/K/V, an op another reader shares) the matmuls keep s = 1 and the reason is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.format.quantize import fake_quantize
from lowbit.ir.graph import Graph, MatmulSite
from lowbit.ir.patterns import (attention_values, call, constant_uses, layernorm_parts, norm_output, rmsnorm_parts,
                                skip_casts)
from lowbit.passes.exact import check_unchanged

ALPHAS = 20                   # alpha in 0, 1/20, ..., 1
MIN_SCALE = 1e-4              # a channel no calibration token used stays representable


@dataclass
class Fold:
    """Matmuls that read one input and where the input's division goes: ``("norm", weight attr, offset, bias attr)``
    (RMSNorm: offset 0 or Gemma's 1, no bias; LayerNorm: offset 0 and its bias, if any), ``("rows", site)`` (the
    projection whose output rows make the input: up in ``act(gate) * up``) or ``("values", site, channel)`` (the
    value projection, whose rows reach the output projection through attention, channel: input -> value row)."""
    sites: list
    carrier: tuple

    @property
    def name(self) -> str:
        """'model.layers.0.self_attn.q_proj, k_proj, v_proj'"""
        return self.sites[0].name + "".join(", " + s.name.rsplit(".", 1)[-1] for s in self.sites[1:])


def find_folds(graph: Graph, recipe) -> tuple[list[Fold], dict]:
    """The sets of matmuls AWQ scales, in graph order, and {reason: count} for the inputs it cannot fold into."""
    readers: dict[fx.Node, list[MatmulSite]] = {}
    for site in graph.sites.values():
        readers.setdefault(site.input_node, []).append(site)
    uses = constant_uses(graph.gm.graph)
    made_by = {s.node: s for s in graph.sites.values()}
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    folds, skipped = [], {}
    for x, sites in readers.items():
        if not any(recipe.spec_for(s.name) for s in sites):
            continue
        carrier, why = _carrier(x, sites, uses, made_by, order)
        if carrier is None:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            folds.append(Fold(sites, carrier))
    return folds, skipped


def _carrier(x: fx.Node, sites: list, uses: dict, made_by: dict, order: dict) -> tuple[Optional[tuple], str]:
    """Where ``x``'s division can go, or (None, why not). ``made_by``: site by its output node; ``order``: each
    node's position in the graph."""
    if set(x.users) != {s.node for s in sites}:
        return None, "the input is also read by a float op"
    if any(uses.get(s.weight_attr, 0) != 1 for s in sites):
        return None, "a weight is shared with another op"
    out = norm_output(x)
    rms, _ = rmsnorm_parts(out)
    if rms is not None:
        weight, offset = rms[1]
        if uses.get(weight.target) == 1:
            return ("norm", weight.target, float(offset or 0.0), None), ""
        return None, "the norm's weight is shared"
    ln = layernorm_parts(out)
    if ln is not None:
        weight, bias = ln[1], ln[2]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and uses.get(weight.target) == 1):
            return None, "the LayerNorm has no weight of its own"
        bias_attr = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        if bias is not None and (bias_attr is None or uses.get(bias_attr) != 1):
            return None, "the LayerNorm's bias is not a constant of its own"
        return ("norm", weight.target, 0.0, bias_attr), ""
    if call(x, torch.ops.aten.mul.Tensor):
        for a, b in (x.args, x.args[::-1]):
            up = made_by.get(skip_casts(a)) if isinstance(a, fx.Node) else None
            if (up is not None and len(up.node.users) == 1 and (a is up.node or len(a.users) == 1)
                    and uses.get(up.weight_attr) == 1 and isinstance(b, fx.Node) and not _depends_on(b, up.node, order)):
                if up.bias_attr is not None and uses.get(up.bias_attr) != 1:
                    return None, "the up projection's bias is shared"
                return ("rows", up), ""
    values = attention_values(x, made_by, uses)
    if values is not None:
        return ("values", *values), ""
    return None, "the input is not made by a norm, a gated MLP's up projection or attention's value projection"


def _depends_on(n: fx.Node, target: fx.Node, order: dict) -> bool:
    """Whether ``n`` reads ``target``: only nodes after it in the graph's (topological) ``order`` can."""
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m is target:
            return True
        if m not in seen and order[m] > order[target]:
            seen.add(m)
            stack.extend(m.all_input_nodes)
    return False


def channel_scales(hessian: torch.Tensor, alpha: float, channel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``m^alpha`` for the channels' RMS m (from ``diag H = 2/n sum x^2``), normalized by sqrt(max * min). With
    ``channel`` (input channel -> the carrier's channel), channels that share a carrier channel share one scale,
    from their mean square."""
    ms = torch.diagonal(hessian).float().clamp_min(0) / 2
    if channel is not None:
        count = torch.zeros(int(channel.max()) + 1).index_add_(0, channel, torch.ones(len(channel)))
        ms = (torch.zeros(len(count)).index_add_(0, channel, ms) / count)[channel]
    s = ms.sqrt().pow(alpha).clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def output_error(w: torch.Tensor, spec, s: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)``, D = W - Q(W diag s) / s: the matmul's squared output error on the calibration inputs."""
    d = w - fake_quantize(w * s, spec) / s
    return float(((d @ hessian) * d).sum())


def search(hessian: torch.Tensor, weights: list, specs: list, channel: Optional[torch.Tensor] = None) -> dict:
    """The alpha (and its scales) of least summed output error over a fold's matmuls ``weights`` [N, K] (those
    whose spec is None stay float and do not count); ``channel`` as for ``channel_scales``."""
    h = hessian.float()
    best = None
    for i in range(ALPHAS + 1):
        alpha = i / ALPHAS
        s = channel_scales(h, alpha, channel)
        err = sum(output_error(w, spec, s, h) for w, spec in zip(weights, specs) if spec is not None)
        if i == 0:
            plain = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return {"alpha": alpha, "scales": s, "error": err, "plain_error": plain}


def apply_fold(graph: Graph, fold: Fold, s: torch.Tensor) -> None:
    """Multiply the fold's weight columns by ``s`` and divide its carrier by ``s``, in float32, each constant then
    stored in its own dtype."""
    def scaled(target: str, factor: torch.Tensor):
        t = graph.attr(target).detach()
        graph.set_constant(target, (t.float() * factor).to(t.dtype))

    for site in fold.sites:
        scaled(site.weight_attr, s[:, None] if site.weight_is_kn else s[None, :])
    kind = fold.carrier[0]
    if kind == "norm":
        _, weight, offset, bias = fold.carrier
        t = graph.attr(weight).detach()
        graph.set_constant(weight, ((t.float() + offset) / s - offset).to(t.dtype))
        if bias is not None:
            scaled(bias, 1 / s)
    else:                       # rows: s per row; values: the shared scale of each value channel
        up = fold.carrier[1]
        inv = 1 / s if kind == "rows" else (1 / s).new_empty(up.out_features).index_copy_(0, fold.carrier[2], 1 / s)
        scaled(up.weight_attr, inv[None, :] if up.weight_is_kn else inv[:, None])
        if up.bias_attr is not None:
            scaled(up.bias_attr, inv)


def awq_pass(graph: Graph, recipe, calib_ids: torch.Tensor, device="cpu", show_progress: bool = True,
             chunk: int = 8) -> dict:
    """Scale every fold of ``graph`` (in place, exact in float: checked on the graph's logits) before the weight
    pass; returns per-fold alpha and output errors, and the inputs left unscaled by reason."""
    from lowbit.ir.calibration import StreamingCalibrator
    from lowbit.progress import progress_bar

    folds, skipped = find_folds(graph, recipe)
    if not folds:
        raise LowbitError(f"recipe '{recipe.name}' scales activations (awq), but no quantized matmul of this model reads "
                          "a norm or a gated MLP's up projection; drop awq from the recipe")
    fold_of = {s.name: f for f in folds for s in f.sites}
    targets = [name for name in graph.sites if name in fold_of]
    chosen: dict[int, dict] = {}
    bar = progress_bar(None, desc="awq", total=len(folds), disable=not show_progress)

    def measure(site, hessian):
        fold = fold_of[site.name]
        if id(fold) not in chosen:                # the fold's matmuls share this Hessian: one search
            h = hessian.float()
            ws = [graph.weight(s).float().to(h.device) for s in fold.sites]
            channel = fold.carrier[2] if fold.carrier[0] == "values" else None
            chosen[id(fold)] = search(h, ws, [recipe.spec_for(s.name) for s in fold.sites], channel)
            bar.update(1)
            bar.set_postfix_str(f"{fold.name} alpha {chosen[id(fold)]['alpha']:.2f}")
        return None                               # statistics only: the float graph runs on

    StreamingCalibrator(graph, calib_ids, chunk=chunk, device=device).run(targets, measure)
    bar.close()
    probe = calib_ids[:1, : min(32, calib_ids.shape[1])].cpu()
    before = check_unchanged(graph, probe)
    for fold in folds:
        apply_fold(graph, fold, chosen[id(fold)]["scales"].cpu())
    diff = check_unchanged(graph, probe, before, "activation-aware scaling (awq)")
    return {"folds": {f.name: {"alpha": chosen[id(f)]["alpha"], "error": float(f"{chosen[id(f)]['error']:.6g}"),
                               "plain_error": float(f"{chosen[id(f)]['plain_error']:.6g}")} for f in folds},
            "unscaled": skipped, "max_rel_diff": diff}
