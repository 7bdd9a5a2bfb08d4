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

With ``learn="rounding"`` (AutoRound) the student's weights stay; it learns how each one rounds and each group's
clip range (``RoundingLinear``) by sign-gradient descent (``SignSGD``), and the weight pass stores the codes it
learnt. The walk over the blocks, the losses and the inputs are the same.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lowbit.progress import progress_bar
from lowbit.errors import LowbitError
from lowbit.format.quantize import (QuantSpec, compute_qparams, dequantize_codes, expand_groups, qparams_from_range,
                                    quantize_codes, range_groups, round_ste)
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
        return _fake_quant_matmul(x, w, self.bias, self.spec)


class RoundingLinear(torch.nn.Module):
    """The student's matmul when it learns the rounding (AutoRound): the float weight W stays; each weight's codes
    are ``clamp(round(W/s + V) + z)`` with a learned offset V in [-1/2, 1/2], and each group's grid (s, z) comes
    from a learned range [beta * min, alpha * max] with alpha, beta in [1/2, 1] (``qparams_from_range``, the
    format's own formula). At V = 0, alpha = beta = 1 it is round-to-nearest on the min/max grid. ``freeze``
    fixes the codes and the stored (float16) grid the artifact gets; the forward pass then runs exactly those."""

    V_RANGE = 0.5
    CLIP_RANGE = (0.5, 1.0)

    def __init__(self, weight: torch.Tensor, bias, spec: QuantSpec):
        super().__init__()
        w = weight.detach().float().clone()                                          # [N, K]
        n, k = w.shape
        self.spec, self.group = spec, spec.group(k)
        wg = range_groups(w, self.group)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("wmin", wg.amin(dim=2))
        self.register_buffer("wmax", wg.amax(dim=2))
        self.v = torch.nn.Parameter(torch.zeros_like(w))
        self.alpha = torch.nn.Parameter(torch.ones(n, wg.shape[1]))
        self.beta = torch.nn.Parameter(torch.ones(n, wg.shape[1]))
        self.frozen = None                              # (scale, zero, codes) once learnt

    def grid(self, ste: bool = True):
        """(scale, zero) [N, G] of the current clip range."""
        return qparams_from_range(self.beta * self.wmin, self.alpha * self.wmax, self.spec, ste=ste)

    def codes(self, scale, zero, rnd=torch.round) -> torch.Tensor:
        k = self.weight.shape[1]
        s, z = expand_groups(scale.float(), k, self.group), expand_groups(zero.float(), k, self.group)
        return torch.clamp(rnd(self.weight / s + self.v) + z, 0, self.spec.maxq)

    def dequantized(self) -> torch.Tensor:
        if self.frozen is not None:
            scale, zero, q = self.frozen
        else:
            scale, zero = self.grid()
            q = self.codes(scale, zero, round_ste)
        return dequantize_codes(q, scale, zero, self.group)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-self.V_RANGE, self.V_RANGE)
        for p in (self.alpha, self.beta):
            p.clamp_(*self.CLIP_RANGE)

    @torch.no_grad()
    def freeze(self) -> tuple:
        """(scale float16 [N, G], zero uint8 [N, G], codes uint8 [N, K]) as stored; the forward pass uses them."""
        scale, zero = self.grid(ste=False)
        self.frozen = (scale, zero, self.codes(scale, zero).to(torch.uint8))
        return self.frozen

    def forward(self, x):
        return _fake_quant_matmul(x, self.dequantized(), self.bias, self.spec)


def _fake_quant_matmul(x, w, bias, spec: QuantSpec):
    """x @ w.T + b, with x per-token INT8 under an STE when the spec quantizes activations."""
    if spec.act_bits:
        q, s = quantize_rows_int8(x.detach())
        x = _ste(x, (q.float() * s).to(x.dtype))
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


class SignSGD:
    """AutoRound's optimizer: each step moves every parameter by ``lr`` against its gradient's sign, the rate
    decaying linearly to 0 over ``steps``; the offsets and clip factors are then clamped to their ranges."""

    def __init__(self, modules: list, lr: float, steps: int):
        self.modules, self.lr, self.steps, self.done = modules, lr, steps, 0
        self.params = [p for m in modules for p in m.parameters()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr = self.lr * (1 - self.done / self.steps)
        for p in self.params:
            if p.grad is not None:
                p.sub_(lr * p.grad.sign())
        for m in self.modules:
            m.clamp_()
        self.done += 1


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


def _student(model, name: str, plan: list, recipe, learn: str):
    """A float copy of block ``name`` whose quantized matmuls are FakeQuantLinear (``learn="weights"``: their
    weights and biases learn) or RoundingLinear (``"rounding"``). Returns (student, {site name: module})."""
    from lowbit.frontend.hf_modules import swap_module

    student = copy.deepcopy(model.get_submodule(name)).float()
    for p in student.parameters():
        p.requires_grad_(False)
    fq = {}
    for site, spec in plan:
        fq[site.name] = (RoundingLinear(*_site_weights(model, site), spec) if learn == "rounding"
                         else FakeQuantLinear(*_site_weights(model, site), spec, recipe.scheme.mse))
        swap_module(student, site.name[len(name) + 1:], fq[site.name])
    return student, fq


def _optimizer(fq: dict, opts: LKDSettings):
    if opts.learn == "rounding":
        return SignSGD(list(fq.values()), opts.rate, opts.steps)
    return torch.optim.Adam([p for m in fq.values() for p in m.parameters()], lr=opts.rate)


@torch.no_grad()
def _keep(model, graph, site, module) -> None:
    """Write a learnt matmul into the model's float weights, and its grid (and codes) for the weight pass."""
    mod = model.get_submodule(site.name)
    if isinstance(module, RoundingLinear):
        scale, zero, codes = module.frozen
        w, bias = dequantize_codes(codes, scale, zero, module.group), None
        graph.fixed_qparams[site.name] = (scale, zero, codes)
    else:
        w, bias = module.weight, module.bias
        # The weight pass must quantize onto the grid the student learned against, not a new one.
        graph.fixed_qparams[site.name] = (module.scale.clone(), module.zero.clone())
    mod.weight.copy_((w.t() if site.weight_is_kn else w).to(mod.weight.dtype))
    if bias is not None:
        mod.bias.copy_(bias.to(mod.bias.dtype))


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
        student, fq = _student(model, name, plan[name], recipe, opts.learn)
        for m in fq.values():
            m.requires_grad_(True)
        opt = _optimizer(fq, opts)

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
            for m in fq.values():
                if isinstance(m, RoundingLinear):
                    m.freeze()       # measured as stored: the float16 grid and the codes
            after = sum(float(loss_of(i)) for i in range(len(data))) / len(data)
            kept = after < before
            if kept:               # a block LKD did not improve keeps its original weights
                for site, _ in plan[name]:
                    _keep(model, graph, site, fq[site.name])
            if on_block is not None:
                on_block([(site, spec, *_site_weights(model, site)) for site, spec in plan[name]])
            if opts.inputs == "quantized":
                if not kept:
                    student, _ = _student(model, name, plan[name], recipe, "weights")
                student_in = [_run(student, x, a, k) for x, (_, a, k) in zip(student_in, data)]
            else:
                student_in = targets
            # The teacher's next block sees the float model's activations: its own outputs.
            data = [(t, a, k) for t, (_, a, k) in zip(targets, data)]
        block = student = fq = opt = None          # this block's copies go before the next block's come
        weights.drop(held)
        stats[name] = {"loss_before": before, "loss_after": after, "kept": kept,
                       "seconds": round(time.perf_counter() - tb, 2)}
        if chain is not None:
            done += 1
            chain.save(done, [h for h, _, _ in data], student_in, stats)
        bar.set_postfix_str(f"{name} loss {before:.3g} -> {after:.3g}")
    return {"blocks": stats, "seconds": round(time.perf_counter() - t0, 2), "options": opts.to_dict(),
            "lr_used": opts.rate}



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
