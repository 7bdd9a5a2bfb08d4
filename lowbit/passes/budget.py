"""Mixed precision under a size budget: each quantized matmul gets the (bits, group) format that minimizes the
model's estimated loss increase while the average stored bits per weight (group scales and zero points included)
stay within the budget.

The estimate is second order in the loss L (next-token cross-entropy on the calibration windows, summed over
tokens), with the Fisher information of each matmul's outputs and its inputs' second moments as if independent:
``dL ~ 1/2 sum_t (D x_t)^T diag(f) (D x_t) ~ 1/(2T) f^T (D * D) h``, D = W - Q(W) the round-to-nearest error of a
candidate format, ``f_o = sum_t (dL/dy_to)^2`` and ``h_i = sum_t x_ti^2`` measured by one forward and backward pass
of the float graph per calibration chunk. Unlike a layer's own output error, it weighs each layer's error by how
much the loss moves with its outputs, so the layers the loss is most sensitive to keep more bits.

The choice is a multiple-choice knapsack, solved the usual way: every layer starts at its smallest format and the
upgrade with the largest loss decrease per added byte (along each layer's lower convex hull of bytes against
loss) is taken while it fits. The plan is a recipe: the given one with one override per layer (its exact name),
which a later compile reruns without measuring again.
"""

from __future__ import annotations

import heapq
from dataclasses import replace

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.format.quantize import fake_quantize, storage_bytes
from lowbit.ir.graph import Graph

# The formats a plan chooses from: (bits, group size). A target that cannot hold one drops it (``candidates``).
FORMATS = ((2, 64), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (8, 128))
WINDOWS = 32                 # calibration windows the sensitivities are measured on (the first ones)


def candidates(graph: Graph, recipe, accepts) -> list[tuple[int, int]]:
    """The formats of FORMATS whose uniform recipe ``accepts(recipe)`` (the target's check) takes for ``graph``."""
    out = []
    for bits, group in FORMATS:
        try:
            accepts(replace(recipe, scheme=replace(recipe.scheme, bits=bits, group_size=group)))
        except LowbitError:
            continue
        out.append((bits, group))
    if not out:
        raise LowbitError(f"the target accepts none of the formats a budget plan chooses from "
                          f"({', '.join(f'w{b}g{g}' for b, g in FORMATS)}); drop --budget-bits")
    return out


def check_fits(graph: Graph, recipe, formats: list) -> None:
    """Refuse a budget below the stored bits of every layer's smallest format (before anything is measured)."""
    from lowbit.passes.rtn import quantizable

    smallest = weights = 0
    for site, spec in quantizable(graph, recipe):
        weights += site.in_features * site.out_features
        smallest += min(storage_bytes(site.out_features, site.in_features, replace(spec, bits=b, group_size=g))
                        for b, g in formats if g <= site.in_features)
    if weights and recipe.budget_bits * weights / 8 < smallest:
        raise LowbitError(f"--budget-bits {recipe.budget_bits:g} is below the smallest formats' "
                          f"{smallest * 8 / weights:.3f} bits per weight; raise it")


class _Fisher(fx.Interpreter):
    """Runs the float graph keeping what the estimate needs: the residual stream requires grad from the token
    embedding on, each quantized matmul's input gets its squared sum, each output a hook summing squared
    gradients."""

    def __init__(self, graph: Graph, names: list[str]):
        super().__init__(graph.gm)
        self.sites = {graph.sites[n].node: graph.sites[n] for n in names}
        self.inputs = {}
        for site in self.sites.values():
            self.inputs.setdefault(site.input_node, []).append(site.name)
        self.embedding = graph.embeddings[graph.input_embedding].node if graph.input_embedding else None
        self.h: dict[str, torch.Tensor] = {}
        self.f: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.embedding:
            out = out.detach().requires_grad_()
        if n in self.inputs:
            sq = out.detach().float().pow(2).reshape(-1, out.shape[-1]).sum(0)
            for name in self.inputs[n]:
                self.h[name] = self.h.get(name, 0) + sq
        site = self.sites.get(n)
        if site is not None and out.requires_grad:
            out.register_hook(lambda g, name=site.name: self._grad(name, g))
        return out

    def _grad(self, name, g):
        sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
        self.f[name] = self.f.get(name, 0) + sq


def measure(graph: Graph, names: list[str], calib_ids: torch.Tensor, chunk: int = 1,
            show_progress: bool = False) -> dict:
    """{layer: (f [N], h [K])} over the calibration windows ``calib_ids`` (forward and backward, ``chunk`` windows
    at a time)."""
    from lowbit.progress import progress_bar

    if graph.kv is None or graph.input_embedding is None:
        raise LowbitError("a budget plan measures a causal LM's loss; this model is an encoder; drop --budget-bits")
    fisher = _Fisher(graph, names)
    for ids in progress_bar(calib_ids.split(chunk), desc="sensitivity", disable=not show_progress):
        logits = fisher.run(*graph.flat_inputs(ids, torch.ones_like(ids)))[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="sum")
        loss.backward()
    missing = [n for n in names if n not in fisher.f or n not in fisher.h]
    if missing:
        raise LowbitError(f"the loss does not depend on {missing[0]} ({len(missing)} layers); drop --budget-bits")
    return {n: (fisher.f[n], fisher.h[n]) for n in names}


def estimate(w: torch.Tensor, spec, f: torch.Tensor, h: torch.Tensor, tokens: int) -> float:
    """``1/(2T) f^T (D * D) h`` for the weight ``w`` [N, K] quantized round-to-nearest to ``spec``."""
    d = w.float() - fake_quantize(w.float(), spec)
    return float(f @ (d * d) @ h) / (2 * tokens)


def _hull(points: list[tuple[int, float, tuple]]) -> list[tuple[int, float, tuple]]:
    """The lower convex hull of (bytes, loss, format) points, by increasing bytes and decreasing loss."""
    hull: list = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if hull and p[1] >= hull[-1][1]:
            continue                                   # more bytes, no less loss
        while len(hull) >= 2:
            (b0, l0, _), (b1, l1, _) = hull[-2], hull[-1]
            if (l1 - l0) * (p[0] - b0) >= (p[1] - l0) * (b1 - b0):
                hull.pop()                             # the middle point lies on or above the chord
            else:
                break
        hull.append(p)
    return hull


def choose(options: dict[str, list[tuple[int, float, tuple]]], budget_bytes: float) -> dict[str, tuple]:
    """{layer: format} within ``budget_bytes`` from {layer: [(bytes, estimated loss, format)]}: greedy upgrades along
    each layer's hull by loss decrease per byte. ValueError(smallest bytes) when even the smallest formats do not
    fit."""
    hulls = {n: _hull(p) for n, p in options.items()}
    at = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bytes:
        raise ValueError(used)
    heap = []

    def push(n):
        i = at[n]
        if i + 1 < len(hulls[n]):
            (b0, l0, _), (b1, l1, _) = hulls[n][i], hulls[n][i + 1]
            heapq.heappush(heap, (-(l0 - l1) / (b1 - b0), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        step = hulls[n][at[n] + 1][0] - hulls[n][at[n]][0]
        if used + step > budget_bytes:
            continue                                   # this upgrade does not fit; cheaper ones may
        used += step
        at[n] += 1
        push(n)
    return {n: hulls[n][at[n]][2] for n in hulls}


def plan(graph: Graph, recipe, calib_ids: torch.Tensor, formats: list, budget_bits: float,
         show_progress: bool = True) -> tuple:
    """(the planned recipe, report): the budget's formats for every matmul ``recipe`` quantizes."""
    from lowbit.passes.settings import Override
    from lowbit.passes.rtn import quantizable

    layers = [(site, spec) for site, spec in quantizable(graph, recipe)]
    calib_ids = calib_ids[:WINDOWS]
    stats = measure(graph, [s.name for s, _ in layers], calib_ids, show_progress=show_progress)
    tokens = int(calib_ids.numel())
    options, weights = {}, 0
    for site, spec in layers:
        w = graph.weight(site).detach()
        weights += site.in_features * site.out_features
        options[site.name] = []
        for bits, group in formats:
            if group > site.in_features:
                continue
            fmt = replace(spec, bits=bits, group_size=group)
            size = storage_bytes(site.out_features, site.in_features, fmt)
            options[site.name].append((size, estimate(w, fmt, *stats[site.name], tokens), (bits, group)))
    try:
        chosen = choose(options, budget_bits * weights / 8)
    except ValueError as e:
        raise LowbitError(f"--budget-bits {budget_bits:g} is below the smallest formats' {e.args[0] * 8 / weights:.2f} "
                          "bits per weight; raise it") from None
    overrides = tuple(Override(_exact(name), bits=b, group_size=g) for name, (b, g) in chosen.items())
    planned = replace(recipe, name=f"{recipe.name}-plan{budget_bits:g}", budget_bits=0.0,
                      scheme=replace(recipe.scheme, overrides=overrides + recipe.scheme.overrides))
    sizes = {n: next(o[0] for o in options[n] if o[2] == chosen[n]) for n in chosen}
    losses = {n: next(o[1] for o in options[n] if o[2] == chosen[n]) for n in chosen}
    counts: dict[str, int] = {}
    for b, g in chosen.values():
        counts[f"w{b}g{g}"] = counts.get(f"w{b}g{g}", 0) + 1
    report = {"budget_bits": budget_bits, "bits_per_weight": round(sum(sizes.values()) * 8 / weights, 4),
              "formats": counts, "estimated_loss": float(f"{sum(losses.values()):.6g}"),
              "layers": {n: f"w{b}g{g}" for n, (b, g) in chosen.items()}}
    return planned, report


def _exact(name: str) -> str:
    """An override pattern that matches exactly ``name`` (fnmatch's specials in brackets)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
