"""Quantization math: packing, grids, groups (incl. ragged), and the op against a float reference."""

import pytest
import torch

from lowbit.format.quantize import (QuantSpec, compute_qparams, dequantize_codes, expand_groups, fake_quantize,
                                    pack_codes, packed_cols, quantize_weight, unpack_codes)
from lowbit.ops import dequantized_weight


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [576, 64, 37, 1])
def test_pack_roundtrip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 2**bits, (7, k), generator=g, dtype=torch.int32).to(torch.uint8)
    p = pack_codes(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (7, packed_cols(k, bits))
    assert torch.equal(unpack_codes(p, bits, k), q)


def test_pack_4bit_is_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_codes(q, 4).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [128, 64, 0])
def test_quantize_error_bound_and_range(bits, sym, group):
    torch.manual_seed(bits + 10 * group + sym)
    w = torch.randn(33, 576) * torch.rand(33, 1) * 3
    spec = QuantSpec(bits, group, sym)
    q, s, z = quantize_weight(w, spec)
    g = spec.group(576)
    assert s.dtype == torch.float16 and z.dtype == torch.uint8
    assert s.shape == (33, -(-576 // g)) and int(q.max()) <= 2**bits - 1
    dq = dequantize_codes(q, s, z, g)
    # Each weight is within one quantization step of its value (half a step but for the range clamp).
    step = expand_groups(s.float().abs(), 576, g)
    assert torch.all((dq - w).abs() <= step * 1.001)
    # ... and every one not clamped to an end code is within half a step: rounding, not truncation.
    inside = (q > 0) & (q < 2**bits - 1)
    assert inside.float().mean() > (0.3 if bits == 2 else 0.8)
    assert torch.all(((dq - w).abs() <= step * 0.501)[inside])


def test_symmetric_grid_hits_max_exactly():
    # Up to 4 bits the value of largest magnitude takes the bottom code (-8), whatever its sign: 16 levels.
    for w, at in ((torch.tensor([[-3.0, 1.0, 2.0, 0.5]]), 0), (torch.tensor([[-2.0, 1.0, 3.0, 0.5]]), 2)):
        q, s, z = quantize_weight(w, QuantSpec(4, 0, sym=True))
        assert int(z) == 8 and q[0, at] == 0 and abs(float(s)) == 3.0 / 8
        assert torch.allclose(dequantize_codes(q, s, z, 4), w, atol=abs(float(s)) / 2 + 1e-6)
        assert torch.allclose(dequantize_codes(q, s, z, 4)[0, at], w[0, at], rtol=1e-3)
    # 8 bits: +-max -> z +- 127 (W8A8's integer weights stay in [-127, 127]).
    w = torch.tensor([[-3.0, 1.0, 3.0, 0.5]])
    q, s, z = quantize_weight(w, QuantSpec(8, 0, sym=True))
    assert int(z) == 128 and q[0, 2] == 255 and q[0, 0] == 1
    assert torch.allclose(dequantize_codes(q, s, z, 8)[0, [0, 2]], torch.tensor([-3.0, 3.0]), rtol=1e-3)


def test_ragged_last_group_uses_only_its_columns():
    torch.manual_seed(0)
    w = torch.randn(4, 576) * 0.1
    w[:, 550] = 50.0                              # outlier inside the ragged group [512, 576)
    s, z = compute_qparams(w, QuantSpec(4, 128))
    assert s.shape == (4, 5)
    assert torch.all(s[:, 4].float() > 1.0) and torch.all(s[:, :4].float() < 0.2)


def test_zero_rows_exact_and_constant_rows_close():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    for sym in (False, True):
        dq = fake_quantize(w, QuantSpec(4, 32, sym))
        assert torch.equal(dq[0], w[0]) and torch.equal(dq[2], w[2])       # zero rows: exact
        assert torch.allclose(dq[1], w[1], rtol=1e-3)                      # up to the float16 scale


def test_codes_agree_with_stored_float16_scale():
    torch.manual_seed(1)
    w = torch.randn(16, 256)
    spec = QuantSpec(4, 64)
    q, s, z = quantize_weight(w, spec)
    dq = dequantized_weight(pack_codes(q, 4), s, z, 4, 64, 256)
    # Re-quantizing the dequantized weight against the same stored params gives the same codes.
    from lowbit.format.quantize import quantize_codes
    assert torch.equal(quantize_codes(dq, s, z, spec), q)


def test_bits_out_of_range():
    with pytest.raises(ValueError):
        QuantSpec(1, 64)
    with pytest.raises(ValueError):
        QuantSpec(9, 64)
