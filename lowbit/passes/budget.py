"""Mixed precision under a size budget: each quantized matmul gets the (bits, group) format that minimizes the
model's estimated loss increase while the average stored bits per weight (group scales and zero points included)
stay within the budget.

The estimate is second order in the loss L (next-token cross-entropy on the calibration windows, summed over
tokens), with the Fisher information of each matmul's outputs and its inputs' second moments as if independent:
``dL ~ 1/2 sum_t (D x_t)^T diag(f) (D x_t) ~ 1/(2T) sum_o f_o (D S D^T)_oo``, with ``f_o = sum_t (dL/dy_to)^2``
from one forward and backward pass of the float graph per calibration window, ``S = sum_t x_t x_t^T`` the
inputs' second moments (GPTQ's Hessian, from a streaming pass over the float graph, one block at a time), and
D = W - Q(W) the error the recipe's own rounding leaves in a candidate format: GPTQ's (which spreads each
column's error where ``S`` makes it cost least) for GPTQ and for learnt rounding, round-to-nearest's otherwise.
Unlike a layer's own output error, it weighs each layer's error by how much the loss moves with its outputs, so
the layers the loss is most sensitive to keep more bits; unlike round-to-nearest's error, it sees how much of a
narrow format's error GPTQ compensates in each layer.

The choice is a multiple-choice knapsack, solved the usual way: every layer starts at its smallest format and the
upgrade with the largest loss decrease per added byte (along each layer's lower convex hull of bytes against
loss) is taken while it fits. The plan is a recipe: the given one with one override per layer (its exact name),
which a later compile reruns without measuring again.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, replace

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.format.quantize import fake_quantize, storage_bytes
from lowbit.ir.graph import Graph

# The formats a plan chooses from: (bits, group size). A target that cannot hold one drops it (``candidates``).
FORMATS = ((2, 64), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (8, 128))
WINDOWS = 32                 # calibration windows the sensitivities are measured on (the first ones)
OTHER_BUDGETS = (3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0)    # other budgets whose estimate the report shows


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
    embedding on, and each quantized matmul's output gets a hook summing its squared gradients."""

    def __init__(self, graph: Graph, names: list[str]):
        super().__init__(graph.gm)
        self.sites = {graph.sites[n].node: graph.sites[n] for n in names}
        self.embedding = graph.embeddings[graph.input_embedding].node if graph.input_embedding else None
        self.f: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.embedding:
            out = out.detach().requires_grad_()
        site = self.sites.get(n)
        if site is not None and out.requires_grad:
            out.register_hook(lambda g, name=site.name: self._grad(name, g))
        return out

    def _grad(self, name, g):
        sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
        self.f[name] = self.f.get(name, 0) + sq


def measure(graph: Graph, names: list[str], calib_ids: torch.Tensor, chunk: int = 1,
            show_progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: f [N]} over the calibration windows ``calib_ids`` (forward and backward, ``chunk`` windows at a
    time)."""
    from lowbit.progress import progress_bar

    if graph.kv is None or graph.input_embedding is None:
        raise LowbitError("a budget plan measures a causal LM's loss; this model is an encoder; drop --budget-bits")
    fisher = _Fisher(graph, names)
    for ids in progress_bar(calib_ids.split(chunk), desc="sensitivity", disable=not show_progress):
        logits = fisher.run(*graph.flat_inputs(ids, torch.ones_like(ids)))[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="sum")
        loss.backward()
    missing = [n for n in names if n not in fisher.f]
    if missing:
        raise LowbitError(f"the loss does not depend on {missing[0]} ({len(missing)} layers); drop --budget-bits")
    return dict(fisher.f)


def estimate(d: torch.Tensor, f: torch.Tensor, hessian: torch.Tensor) -> float:
    """``1/(2T) sum_o f_o (D S D^T)_oo`` for the error ``d`` [N, K], with GPTQ's ``hessian`` = 2/T S [K, K]."""
    d = d.to(hessian.dtype)
    return float(((d @ hessian) * d).sum(1).to(f.dtype) @ f) / 4


def rounds_like_gptq(recipe) -> bool:
    """Whether the recipe's rounding answers to its layers' inputs (GPTQ, learnt rounding) rather than to the
    nearest grid point: the error a plan estimates is then GPTQ's."""
    return recipe.method == "gptq" or (recipe.lkd is not None and recipe.lkd.learn == "rounding")


def errors(graph: Graph, recipe, layers: list, formats: list, fisher: dict, calib_ids: torch.Tensor,
           chunk: int = 8, show_progress: bool = False) -> dict[str, list[tuple[int, float, tuple]]]:
    """{layer: [(stored bytes, estimated loss, (bits, group))]} for every candidate format of each of ``layers``
    [(site, spec)], from one streaming pass of the float graph over ``calib_ids`` (the weights stay float)."""
    from lowbit.ir.calibration import StreamingCalibrator
    from lowbit.passes.gptq import GPTQOptions, gptq_quantize
    from lowbit.progress import progress_bar

    specs = dict((site.name, spec) for site, spec in layers)
    opts = GPTQOptions(**asdict(recipe.gptq), mse=recipe.scheme.mse) if rounds_like_gptq(recipe) else None
    options: dict[str, list] = {}
    bar = progress_bar(None, desc="format errors", total=len(specs), disable=not show_progress)

    def measure_formats(site, hessian):
        w = graph.weight(site).detach().float().cpu()
        hessian = hessian.cpu()
        options[site.name] = []
        for bits, group in formats:
            if group > site.in_features:
                continue
            fmt = replace(specs[site.name], bits=bits, group_size=group)
            q = fake_quantize(w, fmt) if opts is None else gptq_quantize(w, hessian, fmt, opts, site.name).dequant
            size = storage_bytes(site.out_features, site.in_features, fmt)
            options[site.name].append((size, estimate(w - q, fisher[site.name], hessian), (bits, group)))
        bar.update(1)
        return None                                    # the graph keeps its float weights

    hdtype = torch.float64 if recipe.gptq.hessian_dtype == "float64" else torch.float32
    StreamingCalibrator(graph, calib_ids, chunk=chunk, hessian_dtype=hdtype).run(list(specs), measure_formats)
    bar.close()
    return options


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

    layers = list(quantizable(graph, recipe))
    calib_ids = calib_ids[:WINDOWS]
    fisher = measure(graph, [s.name for s, _ in layers], calib_ids, show_progress=show_progress)
    options = errors(graph, recipe, layers, formats, fisher, calib_ids, show_progress=show_progress)
    weights = sum(site.in_features * site.out_features for site, _ in layers)
    try:
        chosen = choose(options, budget_bits * weights / 8)
    except ValueError as e:
        raise LowbitError(f"--budget-bits {budget_bits:g} is below the smallest formats' {e.args[0] * 8 / weights:.2f} "
                          "bits per weight; raise it") from None
    overrides = tuple(Override(_exact(name), bits=b, group_size=g) for name, (b, g) in chosen.items())
    planned = replace(recipe, name=f"{recipe.name}-plan{budget_bits:g}", budget_bits=0.0,
                      scheme=replace(recipe.scheme, overrides=overrides + recipe.scheme.overrides))
    predicted = int(calib_ids[:, 1:].numel())
    counts: dict[str, int] = {}
    for b, g in chosen.values():
        counts[f"w{b}g{g}"] = counts.get(f"w{b}g{g}", 0) + 1
    bits, loss = _totals(options, chosen, weights)
    report = {"budget_bits": budget_bits, "bits_per_weight": round(bits, 4), "formats": counts,
              "estimated_loss": float(f"{loss:.6g}"), "estimated_ppl_ratio": round(math.exp(loss / predicted), 4),
              "other_budgets": _other_budgets(options, weights, predicted),
              "layers": {n: f"w{b}g{g}" for n, (b, g) in chosen.items()}}
    return planned, report


def _totals(options: dict, chosen: dict, weights: int) -> tuple[float, float]:
    """(stored bits per weight, estimated loss) of the plan ``chosen``."""
    picked = [next(o for o in options[n] if o[2] == f) for n, f in chosen.items()]
    return sum(o[0] for o in picked) * 8 / weights, sum(o[1] for o in picked)


def _other_budgets(options: dict, weights: int, predicted: int) -> dict[str, float]:
    """{budget: estimated perplexity ratio to float} of the plans at OTHER_BUDGETS (those that fit), from the
    same measurements: what another budget would cost, without compiling it."""
    out = {}
    for budget in OTHER_BUDGETS:
        try:
            chosen = choose(options, budget * weights / 8)
        except ValueError:
            continue
        out[f"{budget:g}"] = round(math.exp(_totals(options, chosen, weights)[1] / predicted), 4)
    return out


def _exact(name: str) -> str:
    """An override pattern that matches exactly ``name`` (fnmatch's specials in brackets)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
