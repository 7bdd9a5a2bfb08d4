"""Layer-by-layer knowledge distillation (ZeroQuant's LKD), block by block, without the training data.

For each block of the model: the float block is the teacher; the student is a copy whose quantized
matmuls fake-quantize their weights (and, for W8A8 layers, their input activations per token) with a
straight-through estimator. The teacher runs on the float model's activations at the block's input (from
calibration text, or random token sequences when no text is available); Adam minimises the distance
between its output and the student's, a per-token relative MSE (``block_loss``). The student's weights
then replace the block's float weights, and the recipe's weight pass (RTN) quantizes them onto the same
fixed grid (``graph.fixed_qparams``) into the final format: LKD changes what is quantized, never the
format.

The student's input is, by default, the output of the already distilled, fake-quantized blocks before it
(``inputs="quantized"``) rather than the teacher's own input (``"float"``, the ZeroQuant paper's setup).
Each block then also learns to undo the error its predecessors leave, which is the error the deployed
model actually carries. On the demo LM (W4A8 mixed, 20 windows of eval.txt) LKD closed 12% of the
perplexity gap to float with float inputs and plain MSE, 35% with quantized inputs and plain MSE, and 46%
with quantized inputs and the per-token loss, the default (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lowbit.progress import progress_bar
from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec, compute_qparams, dequantize_codes, quantize_codes
from lowbit.ops import quantize_rows_int8
from lowbit.passes.settings import LKDSettings

def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward pass, identity gradient to x in the backward pass."""
    return x + (q - x).detach()


class FakeQuantLinear(torch.nn.Module):
    """The student's matmul: ``x @ Q(W).T + b`` with Q the recipe's weight quantizer under an STE.

    Scales and zero points are computed once from the starting weights (with the recipe's MSE clipping
    search when it has one) and held fixed, so the weights learn against a stable grid.
    """

    def __init__(self, weight: torch.Tensor, bias, spec: QuantSpec, mse: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone())          # [N, K]
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone())
        self.spec, self.group = spec, spec.group(weight.shape[1])
        scale, zero = compute_qparams(self.weight.detach(), spec, mse=mse)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x):
        w0 = self.weight.detach()
        q = quantize_codes(w0, self.scale, self.zero, self.spec)
        w = _ste(self.weight, dequantize_codes(q, self.scale, self.zero, self.group))
        if self.spec.act_bits:
            q, s = quantize_rows_int8(x.detach())
            x = _ste(x, (q.float() * s).to(x.dtype))
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _StopForward(Exception):
    pass


def block_inputs(model, first_block: torch.nn.Module, ids: torch.Tensor, batch: int) -> list[tuple]:
    """(hidden_states, other args, kwargs) at the first block's input for each batch of ``ids``."""
    captured = []

    def grab(_module, args, kwargs):
        captured.append((args[0].detach(), args[1:], kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch):
            try:
                with torch.no_grad():
                    model(input_ids=ids[i:i + batch], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between the student's and the teacher's block outputs.

    ``mse`` is plain MSE. ``token`` divides each token's squared error by the teacher's mean square at that
    token: decoder residual streams hold a few tokens (the first one, an attention sink) whose norm is 100x
    the others', and plain MSE spends all the student's capacity on them, while the next block and the head
    read each token through a LayerNorm/RMSNorm that removes its scale.
    """
    if kind == "mse":
        return F.mse_loss(out, target)
    err = (out - target).pow(2).mean(-1)
    return (err / target.pow(2).mean(-1).clamp_min(1e-12)).mean()


def _run(block, hidden, args, kwargs):
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _site_weights(model, site) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [N, K], bias) of a quantized matmul's module."""
    module = model.get_submodule(site.name)
    return (module.weight.t() if site.weight_is_kn else module.weight), (
        None if site.bias_attr is None else module.bias)


def _student(model, name: str, plan: list, recipe):
    """A float copy of block ``name`` whose quantized matmuls are FakeQuantLinear; only their weights and biases
    learn. Returns (student, {site name: FakeQuantLinear})."""
    from lowbit.frontend.hf_modules import swap_module

    student = copy.deepcopy(model.get_submodule(name)).float()
    for p in student.parameters():
        p.requires_grad_(False)
    fq = {}
    for site, spec in plan:
        fq[site.name] = FakeQuantLinear(*_site_weights(model, site), spec, recipe.scheme.mse)
        swap_module(student, site.name[len(name) + 1:], fq[site.name])
    return student, fq


def lkd_pass(model: torch.nn.Module, graph, recipe, ids: torch.Tensor, opts: LKDSettings,
             show_progress: bool = True, weights=None, on_block: Optional[Callable] = None, chain=None) -> dict:
    """Distil every block that holds quantized matmuls: updates ``model``'s float weights in place and records
    each distilled layer's scales and zero points in ``graph.fixed_qparams`` for the weight pass.

    A streaming compile passes the weightless ``model`` with ``weights`` (``frontend.weights.ModuleWeights``):
    the embeddings are read for the block inputs and each block while it is distilled, then let go, after
    ``on_block([(site, spec, weight [N, K], bias)])`` took the block's final float weights for the weight pass.
    ``chain`` (``passes.checkpoint.DistillationChain``) saves the activations after each block and, when it holds
    some, starts after the blocks they come from (``--resume``: those blocks' layers are in the checkpoint)."""
    from lowbit.passes.rtn import quantizable

    plan: dict[str, list] = {}
    for site, spec in quantizable(graph, recipe):
        if site.block:
            plan.setdefault(site.block, []).append((site, spec))
    if not plan:
        raise LowbitError(f"LKD needs quantized weights in the model's blocks; recipe '{recipe.name}' quantizes none "
                          "(use a recipe with bits < 16, e.g. zq-w4a8-mixed-lkd)")
    blocks = [b for b in graph.blocks if b in plan]
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    weights = weights or _Loaded()
    held = weights.before(blocks[0])
    weights.load(held)
    data = block_inputs(model, model.get_submodule(blocks[0]), ids, opts.batch)
    weights.drop(held)
    student_in = [h for h, _, _ in data]
    stats: dict = {}
    saved = chain.load() if chain is not None else None
    done = 0
    if saved is not None:
        done, teacher, student_in, stats = saved
        data = [(t, a, k) for t, (_, a, k) in zip(teacher, data)]
    bar = progress_bar(blocks[done:], desc="lkd", disable=not show_progress)
    for name in bar:
        held = weights.under(name)
        weights.load(held)
        block = model.get_submodule(name)
        tb = time.perf_counter()
        with torch.no_grad():
            targets = [_run(block, h, a, k) for h, a, k in data]
        student, fq = _student(model, name, plan[name], recipe)
        params = [p for m in fq.values() for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=opts.lr)

        def loss_of(i):
            _, a, k = data[i]
            return block_loss(_run(student, student_in[i], a, k), targets[i], opts.loss)

        with torch.no_grad():
            before = sum(float(loss_of(i)) for i in range(len(data))) / len(data)
        with torch.enable_grad():
            for step in range(opts.steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_of(step % len(data))
                loss.backward()
                opt.step()
        with torch.no_grad():
            after = sum(float(loss_of(i)) for i in range(len(data))) / len(data)
            kept = after < before
            if kept:               # a block LKD did not improve keeps its original weights
                for site, _ in plan[name]:
                    mod = model.get_submodule(site.name)
                    w = fq[site.name].weight
                    mod.weight.copy_((w.t() if site.weight_is_kn else w).to(mod.weight.dtype))
                    if fq[site.name].bias is not None:
                        mod.bias.copy_(fq[site.name].bias.to(mod.bias.dtype))
                    # The weight pass must quantize onto the grid the student learned against, not a new one.
                    graph.fixed_qparams[site.name] = (fq[site.name].scale.clone(), fq[site.name].zero.clone())
            if on_block is not None:
                on_block([(site, spec, *_site_weights(model, site)) for site, spec in plan[name]])
            if opts.inputs == "quantized":
                if not kept:
                    student, _ = _student(model, name, plan[name], recipe)
                student_in = [_run(student, x, a, k) for x, (_, a, k) in zip(student_in, data)]
            else:
                student_in = targets
            # The teacher's next block sees the float model's activations: its own outputs.
            data = [(t, a, k) for t, (_, a, k) in zip(targets, data)]
        block = student = fq = params = opt = None          # this block's copies go before the next block's come
        weights.drop(held)
        stats[name] = {"loss_before": before, "loss_after": after, "kept": kept,
                       "seconds": round(time.perf_counter() - tb, 2)}
        if chain is not None:
            done += 1
            chain.save(done, [h for h, _, _ in data], student_in, stats)
        bar.set_postfix_str(f"{name} loss {before:.3g} -> {after:.3g}")
    return {"blocks": stats, "seconds": round(time.perf_counter() - t0, 2), "options": opts.to_dict()}



class _Loaded:
    """A model in memory: no weights to read or let go."""

    def under(self, path: str) -> list:
        return []

    def before(self, path: str) -> list:
        return []

    def load(self, names: list) -> None:
        pass

    def drop(self, names: list) -> None:
        pass
