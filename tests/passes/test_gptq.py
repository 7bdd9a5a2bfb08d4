"""GPTQ on one layer: better than RTN, equal to a plain float64 implementation, contiguous static groups."""

import pytest
import torch

from lowbit.ir.calibration import Hessian
from lowbit.passes.gptq import GPTQOptions, gptq_quantize, output_error
from lowbit.format.quantize import QuantSpec, compute_qparams, dequantize_codes, quantize_weight


def correlated_layer(n=64, k=192, tokens=2048, seed=0):
    """Weights and a Hessian from inputs with correlated channels and a few outliers (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, torch.randperm(k, generator=g)[:6]] *= 8
    h = Hessian(k)
    h.add(x)
    return torch.randn(n, k, generator=g), h.value()


def plain_gptq(W, H, spec, act_order, static_groups, damp=0.01):
    """The algorithm column by column in float64, with explicit inverse-Hessian (OBS) updates, no lazy batches."""
    W, H = W.double().clone(), H.double().clone()
    n, k = W.shape
    g = spec.group(k)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = compute_qparams(W, spec) if static_groups or g == k else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(n, k, dtype=torch.long)
    pos = torch.argsort(perm)                      # permuted position of every original column
    params = {}
    for j in range(k):
        col = int(perm[j])
        gi = col // g
        if static is not None:
            params[gi] = static[0][:, gi].double(), static[1][:, gi].double()
        elif gi not in params:                     # first column of its group: params from current values
            ss, zz = compute_qparams(W[:, pos[gi * g:(gi + 1) * g]], QuantSpec(spec.bits, 0, spec.sym))
            params[gi] = ss[:, 0].double(), zz[:, 0].double()
        s, z = params[gi]
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, spec.maxq)
        codes[:, col] = q.long()
        err = (W[:, j] - (q - z) * s) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(3, 64), QuantSpec(4, 0), QuantSpec(2, 32, sym=True)])
def test_gptq_beats_rtn_by_30_percent(spec):
    W, H = correlated_layer(seed=spec.bits)
    q, s, z = quantize_weight(W, spec)
    rtn = output_error(W, dequantize_codes(q, s, z, spec.group(W.shape[1])), H)
    r = gptq_quantize(W, H, spec, GPTQOptions())
    gptq = output_error(W, dequantize_codes(r.codes, r.scales, r.zeros, spec.group(W.shape[1])), H)
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order,static", [(True, True), (True, False), (False, False), (False, True)])
@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(3, 32), QuantSpec(4, 0)])
def test_lazy_batches_equal_plain_float64_algorithm(spec, act_order, static):
    W, H = correlated_layer(n=48, k=200, seed=11)       # K=200: ragged last group, blocks straddle groups
    r = gptq_quantize(W, H, spec, GPTQOptions(act_order=act_order, static_groups=static, block=48))
    ref = plain_gptq(W, H, spec, act_order, static)
    diff = (r.codes.long() - ref).abs()
    assert (diff == 0).float().mean() >= 0.999, (diff > 0).sum()
    assert int(diff.max()) <= 1


def test_act_order_static_groups_store_contiguous_groups():
    W, H = correlated_layer(n=32, k=256, seed=3)
    spec = QuantSpec(4, 64)
    r = gptq_quantize(W, H, spec, GPTQOptions(act_order=True, static_groups=True))
    assert not torch.equal(torch.argsort(torch.diag(H), descending=True), torch.arange(256))   # a real permutation
    # The stored codes with plain contiguous groups (no g_idx) give exactly the weight GPTQ computed...
    assert torch.equal(dequantize_codes(r.codes, r.scales, r.zeros, 64), r.dequant)
    # ... and the groups' params are the static ones of the original, unpermuted weight.
    s, z = compute_qparams(W, spec)
    assert torch.equal(r.scales, s) and torch.equal(r.zeros, z)


def test_dynamic_groups_read_current_values_not_stale_ones():
    """With group < block, a group starting inside a lazy block gets params from the updated columns."""
    W, H = correlated_layer(n=32, k=256, seed=5)
    spec = QuantSpec(3, 32)
    r = gptq_quantize(W, H, spec, GPTQOptions(act_order=False, static_groups=False, block=128))
    stale_s, _ = compute_qparams(W, spec)           # params of the original (not updated) weight
    assert torch.equal(r.scales[:, 0], stale_s[:, 0])      # the first group has seen no update yet
    assert not torch.equal(r.scales[:, 1], stale_s[:, 1])  # later groups reflect the error feedback
    ref = plain_gptq(W, H, spec, False, False)
    assert (r.codes.long() == ref).float().mean() >= 0.999


def test_dead_inputs_and_damp_increase():
    W, H = correlated_layer(n=16, k=64, seed=2)
    H[5, :] = 0
    H[:, 5] = 0                                       # an input channel that is always zero
    r = gptq_quantize(W, H, QuantSpec(4, 32), GPTQOptions())
    assert r.dead == 1 and torch.isfinite(r.dequant).all()
    assert torch.all(r.dequant[:, 5].abs() <= r.scales[:, 0].float() * 1e-6 + 1e-6)   # W[:, dead] zeroed
    a = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    bad = a @ a.t() - 0.5 * torch.eye(64)             # indefinite: 1% of the mean diagonal is not enough
    with pytest.warns(UserWarning, match="dampening raised"):
        r = gptq_quantize(W, bad, QuantSpec(4, 32), GPTQOptions(max_damp_tries=8))
    assert r.damp > 0.01
