"""GPTQ: one-shot second-order weight quantization (Frantar et al., 2022), the algorithm in one class.

For a linear layer with weight W [N, K] and calibration inputs X [n, K], GPTQ quantizes W column by
column and, after each column, spreads that column's rounding error over the not-yet-quantized columns
using the inverse Hessian of the layer's squared output error, ``H = 2/n * X^T X``. Lazy batch updates
(blocks of ``block`` columns) keep it matrix-matrix fast; the Cholesky factor of H^-1 replaces repeated
inverse updates.

lowbit's choices beyond the reference code
------------------------------------------
- Groups are always contiguous in K, so the stored weight never needs a ``g_idx`` gather, act-order
  (columns processed by decreasing H_ii) included. A group's scale/zero is either *static* (from the
  original weight, before any update) or fixed when the group's first column comes up, from the
  *current* (error-updated) values of all its columns, including the lazy-batch updates still pending
  for columns past the block; the reference code reads stale columns when a group starts inside a
  lazy block.
- Dampening grows (x10, with a warning) until the Cholesky factorization succeeds.
- Optional MSE clipping search for the scales (``mse=True``), shared with RTN via ``format.quantize``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import torch

from lowbit.format.quantize import QuantSpec, compute_qparams, num_groups
from lowbit.passes.settings import GPTQSettings


@dataclass(frozen=True)
class GPTQOptions(GPTQSettings):
    """A recipe's GPTQ settings plus what one layer's solve also needs."""
    mse: bool = False             # clipping search for group scales (the scheme's)
    max_damp_tries: int = 6       # dampening x10 per failed Cholesky


@dataclass
class GPTQResult:
    codes: torch.Tensor           # uint8 [N, K]
    scales: torch.Tensor          # float16 [N, G]
    zeros: torch.Tensor           # uint8 [N, G]
    loss: float                   # sum of (w - q)^2 / Hinv_ii^2 / 2: GPTQ's proxy for the output error
    damp: float                   # the dampening finally used
    dead: int                     # input columns with H_ii == 0
    dequant: torch.Tensor         # float32 [N, K]: the weight as GPTQ computed it, column by column


def _inverse_cholesky(h: torch.Tensor, damp: float, tries: int, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + d*I)^-1, raising d x10 until H + d*I factorizes."""
    mean_diag = float(torch.mean(torch.diag(h)))
    k = h.shape[0]
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    for attempt in range(tries):
        d = damp * (10 ** attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + d * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"gptq {name}: Hessian not positive definite; dampening raised to "
                                  f"{damp * 10 ** attempt:g} of the mean diagonal", stacklevel=3)
                return upper, damp * 10 ** attempt
    raise RuntimeError(f"gptq {name}: Cholesky failed even with dampening {damp * 10 ** (tries - 1):g}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, opts: GPTQOptions = GPTQOptions(),
                  name: str = "layer") -> GPTQResult:
    """Quantize ``weight`` [N, K] with GPTQ against ``hessian`` [K, K]; returns codes and group params."""
    n, k = weight.shape
    dtype = hessian.dtype if hessian.dtype == torch.float64 else torch.float32
    W = weight.detach().to(hessian.device, dtype).clone()
    H = hessian.detach().to(dtype).clone()
    g = spec.group(k)
    grouped = g < k
    maxq = spec.maxq

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Group params fixed before any update: static groups, or the single per-channel group.
    static = None
    if opts.static_groups or not grouped:
        s, z = compute_qparams(W, spec, mse=opts.mse)
        static = (s.to(dtype), z.to(dtype))

    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    orig_col = perm if perm is not None else torch.arange(k, device=W.device)

    Hinv, used_damp = _inverse_cholesky(H, opts.damp, opts.max_damp_tries, name)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    dequant = torch.zeros(n, k, dtype=dtype, device=W.device)
    scales = torch.zeros(n, num_groups(k, g), dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    if static is not None:
        scales, zeros = static
    cols = orig_col.tolist()
    group_of = [c // g for c in cols]
    # Permuted positions of every contiguous group's columns (for groups fixed at first touch).
    pos_of = torch.empty(k, dtype=torch.long, device=W.device)
    pos_of[orig_col] = torch.arange(k, device=W.device)
    group_pos = [pos_of[j * g:min((j + 1) * g, k)] for j in range(num_groups(k, g))]
    have = [static is not None] * num_groups(k, g)
    loss = 0.0
    for i1 in range(0, k, opts.block):
        i2 = min(i1 + opts.block, k)
        W1 = W[:, i1:i2].clone()
        C1 = torch.zeros_like(W1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            gi = group_of[col]
            if not have[gi]:
                # Dynamic groups: fixed when the group's first column comes up, from the current values
                # of all its columns (none quantized yet), including the lazy-batch updates still pending
                # for columns past this block. Groups stay contiguous in K, act-order or not.
                pos = group_pos[gi]
                in_block = pos < i2
                cur = torch.empty(n, pos.numel(), dtype=dtype, device=W.device)
                cur[:, in_block] = W1[:, pos[in_block] - i1]
                later = pos[~in_block]
                if later.numel():
                    cur[:, ~in_block] = W[:, later] - Err1[:, :i] @ Hinv[i1:col][:, later]
                s, z = compute_qparams(cur, replace(spec, group_size=0), mse=opts.mse)
                scales[:, gi], zeros[:, gi] = s[:, 0].to(dtype), z[:, 0].to(dtype)
                have[gi] = True
            cur_s, cur_z = scales[:, gi], zeros[:, gi]
            code = torch.clamp(torch.round(w / cur_s) + cur_z, 0, maxq)
            q = (code - cur_z) * cur_s
            C1[:, i], Q1[:, i] = code, q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        codes[:, cols[i1:i2]] = C1.to(torch.uint8)
        dequant[:, cols[i1:i2]] = Q1
        # GPTQ's loss: sum over columns of (w - q)^2 / Hinv_ii^2 / 2, with w the value at quantization time.
        loss += float(torch.sum(Err1 ** 2)) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return GPTQResult(codes.cpu(), scales.to(torch.float16).cpu(), zeros.to(torch.uint8).cpu(),
                      loss, used_damp, int(dead.sum()), dequant.float().cpu())


def output_error(weight: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared output error on the calibration inputs (times 2/n)."""
    d = (weight.double() - dequant.double()).to(hessian.device)
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


def gptq_pass(graph, recipe, calib_ids: torch.Tensor, device="cpu", show_progress: bool = True,
              checkpoint=None, chunk: int = 8, ranks=None, **_) -> dict:
    """GPTQ every matmul the recipe selects, true-sequentially over the calibration ids [S, T].

    Returns per-layer stats and the streaming calibrator's peak activation memory. With a ``checkpoint``,
    finished layers are taken from it and new ones are saved block by block. With ``ranks`` (a compile under
    torchrun), ``calib_ids`` is this process's share and the calibrator sums the Hessians over the processes.
    """
    import time

    from lowbit.ir.calibration import StreamingCalibrator
    from lowbit.ir.graph import QuantizedLayer
    from lowbit.progress import progress_bar
    from lowbit.format.quantize import dequantize_codes, group_error_stats, pack_codes
    from lowbit.passes.rtn import quantizable, quantize_embedding, tied_to

    todo = list(quantizable(graph, recipe))
    specs = {site.name: spec for site, spec in todo}
    order = [site.name for site, _ in todo]
    opts = GPTQOptions(**asdict(recipe.gptq), mse=recipe.scheme.mse)
    hdtype = torch.float64 if recipe.gptq.hessian_dtype == "float64" else torch.float32
    emb, table = quantize_embedding(graph, recipe)
    n_emb = int(emb is not None)
    bar = progress_bar(None, desc="gptq", total=len(order), disable=not show_progress)
    layer_stats: dict[str, dict] = {}

    def quantize(site, hessian):
        if checkpoint is not None and checkpoint.get(site.name) is not None:
            return checkpoint.get(site.name)
        spec = specs[site.name]
        # An lm_head tied to the quantized embedding keeps one table: the embedding's RTN codes, not GPTQ's.
        tied = tied_to(emb, table, site.name, spec.linear_op, graph.weight(site), spec, graph.bias(site))
        if tied is not None:
            return tied
        t0 = time.perf_counter()
        w = graph.weight(site).float().cpu()          # beside the CPU codes it is compared with (gptq_quantize moves it)
        r = gptq_quantize(w, hessian, spec, opts, name=site.name)
        group = spec.group(site.in_features)
        deq = dequantize_codes(r.codes, r.scales, r.zeros, group)
        bias = graph.bias(site)
        bias = None if bias is None else bias.detach().cpu().clone()      # the graph may live on the GPU
        stats = {"loss": round(r.loss, 6), "weight_rel_err": round(float((deq - w).norm() / w.norm().clamp_min(1e-12)), 6),
                 "seconds": round(time.perf_counter() - t0, 3), "damp": r.damp, "dead_inputs": r.dead,
                 **group_error_stats(w, deq, r.scales, group)}
        return QuantizedLayer(name=site.name, op=spec.linear_op, spec=spec, in_features=site.in_features,
                              out_features=site.out_features, group_size=group, qweight=pack_codes(r.codes, spec.bits),
                              scales=r.scales, zeros=r.zeros, bias=bias,
                              method="gptq", stats=stats)

    def on_layer(site, q):
        layer_stats[site.name] = q.stats
        bar.update(1)
        bar.set_postfix_str(f"{site.name} loss {q.stats.get('loss', 0):.4g}")
        if checkpoint is not None:
            checkpoint.add(q)
            i = order.index(site.name)
            if i + 1 == len(order) or graph.sites[order[i + 1]].block != site.block:
                checkpoint.flush()

    cal = StreamingCalibrator(graph, calib_ids, chunk=chunk, device=device, hessian_dtype=hdtype, ranks=ranks)
    stats = cal.run(order, quantize, on_layer)
    bar.close()
    return {"layers": len(order) + n_emb, "peak_activation_bytes": stats.peak_frontier_bytes,
            "calib_tokens": int(calib_ids.numel()), "layer_stats": layer_stats}
