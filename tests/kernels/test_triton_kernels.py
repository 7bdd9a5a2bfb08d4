"""Triton kernels (lowbit.kernels.triton) against the reference ops of lowbit.ops.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one,
on CUDA tensors, compiled. References are always computed on CPU. Shapes stay small: the interpreter runs
every program instance in numpy.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.format.quantize import QuantSpec, dequantize_codes, pack_codes, quantize_weight, unpack_codes  # noqa: E402
from lowbit import ops  # noqa: E402
from lowbit.kernels.triton import act_quant, w4a16, w8a8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPLITK = {"BN": 32, "BK": 32, "SPLIT_K": 3}     # BK 32 with g128: a split ends mid-group; K=256: one split idle
TILED = {"BM": 16, "BN": 32, "BK": 64}
MS = (1, 3, 17, 33)


def _layer(n, k, bits, group, seed, sym=False, bias=True):
    """Packed random weight (rows of varied scale and offset, so zero points spread over the code range)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (0.2 + torch.rand(n, 1, generator=gen))
    if not sym:
        w = w + (torch.rand(n, 1, generator=gen) - 0.5)
    spec = QuantSpec(bits, group, sym)
    q, s, z = quantize_weight(w, spec)
    b = torch.randn(n, generator=gen) if bias else None
    return pack_codes(q, bits), s, z, b, spec.group(k)


def _x(m, k, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen) * (0.5 + torch.rand(m, 1, generator=gen))).to(dtype)


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _errors(y, ref):
    """(relative Frobenius error, max abs error / max |ref|) of y against a float64 reference."""
    d = y.double().cpu() - ref
    return float(d.norm() / ref.norm()), float(d.abs().max() / ref.abs().max())


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _wna16_ref(x, qw, s, z, b, bits, g, k):
    w = dequantize_codes(unpack_codes(qw, bits, k), s, z, g, torch.float64)
    return F.linear(x.double(), w, None if b is None else b.double())


# ---- W4A16 ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,n,k", [
    (4, 32, 40, 256), (4, 64, 72, 200),     # 200 = 3*64 + 8: a ragged last group
    (4, 128, 40, 256), (4, 0, 72, 200),     # per-channel
    (8, 64, 40, 200), (8, 0, 72, 256),
    (4, 32, 40, 101),                       # odd K: 51 bytes a row, not word-aligned, read as bytes
    (2, 64, 40, 192),
])
def test_wna16_matches_reference(bits, group, n, k):
    qw, s, z, b, g = _layer(n, k, bits, group, seed=bits * 1000 + k + group)
    assert w4a16.supports(bits, g, k)
    for m in MS:
        x = _x(m, k, seed=m)
        bias = b if m in (1, 17) else None
        ref = _wna16_ref(x, qw, s, z, bias, bits, g, k)
        for cfg in (SPLITK, TILED):
            y = w4a16.wna16_matmul(*_dev(x, qw, s, z, bias), bits, g, k, config=cfg)
            assert y.shape == (m, n) and y.dtype == torch.float32
            frob, mx = _errors(y, ref)
            assert frob < 1e-5 and mx < 1e-5, (m, cfg, frob, mx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wna16_half_precision(dtype):
    qw, s, z, b, g = _layer(72, 256, 4, 128, seed=11)
    for m in (1, 33):
        x = _x(m, 256, seed=m + 5, dtype=dtype)
        ref = _wna16_ref(x, qw, s, z, b, 4, g, 256)
        for cfg in (SPLITK, TILED):
            y = w4a16.wna16_matmul(*_dev(x, qw, s, z, b), 4, g, 256, config=cfg)
            assert y.dtype == dtype
            frob, mx = _errors(y, ref)
            assert frob < TOL[dtype] / 4 and mx < TOL[dtype], (m, cfg, frob, mx)


@pytest.mark.parametrize("group,k", [(32, 256), (64, 200), (128, 256), (0, 200)])
def test_wna16_paired_fp16(group, k):
    """4-bit weights with fp16 activations take the paired route (int16 reads, nibbles as magic-number floats,
    x permuted to match): against the float64 reference for every group size, a ragged K (200: the last K
    tile is partial), split-K and tiled launches; one code off must fail the same bound."""
    qw, s, z, b, g = _layer(72, k, 4, group, seed=group + k)
    assert qw.shape[1] % 4 == 0                                   # word-aligned rows: the paired route
    for m in MS:
        x = _x(m, k, seed=m + 7, dtype=torch.float16)
        bias = b if m in (1, 17) else None
        ref = _wna16_ref(x, qw, s, z, bias, 4, g, k)
        for cfg in (SPLITK, TILED, {"BN": 16, "BK": 128, "SPLIT_K": 1}):
            y = w4a16.wna16_matmul(*_dev(x, qw, s, z, bias), 4, g, k, config=cfg)
            frob, mx = _errors(y, ref)
            assert frob < TOL[torch.float16] / 4 and mx < TOL[torch.float16], (m, cfg, frob, mx)
    q = unpack_codes(qw, 4, k)
    q[3, 9] = (q[3, 9] + 3) % 16
    x = _x(1, k, seed=1, dtype=torch.float16) + 1.0               # no near-zero x[9] to hide the change
    _, mx = _errors(w4a16.wna16_matmul(*_dev(x, pack_codes(q, 4), s, z, None), 4, g, k, config=SPLITK),
                    _wna16_ref(x, qw, s, z, None, 4, g, k))
    assert mx > TOL[torch.float16]


def test_wna16_default_configs():
    """No forced config: the split-K path for small M, the tiled one above 64 rows (autotuned on a GPU)."""
    qw, s, z, b, g = _layer(40, 128, 4, 64, seed=21)
    for m in (5, 80):
        x = _x(m, 128, seed=m)
        frob, mx = _errors(w4a16.wna16_matmul(*_dev(x, qw, s, z, b), 4, g, 128), _wna16_ref(x, qw, s, z, b, 4, g, 128))
        assert frob < 1e-5 and mx < 1e-5


@triton.jit
def _codes_minus_zero_kernel(q_ptr, z_ptr, o_ptr, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, N: tl.constexpr):
    r = tl.arange(0, N)
    q = tl.load(q_ptr + r).to(tl.int32)
    z = tl.load(z_ptr + r).to(tl.int32)
    tl.store(o_ptr + r, w4a16._codes_minus_zero(q, z, BITS, DOT_DTYPE).to(tl.float32))


# bf16 on a GPU only: the interpreter's bf16 arithmetic is wrong (see store_dtype).
@pytest.mark.parametrize("dtype", [tl.float16] + ([tl.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_minus_zero_exact_for_every_pair(bits, dtype):
    """The kernels' dequantization (magic-number floats for fp16, and bf16 below 8 bits) is exact for every
    (code, zero) pair of the bit width."""
    n = 1 << bits
    q = torch.arange(n).repeat_interleave(n).to(torch.uint8)
    z = torch.arange(n).repeat(n).to(torch.uint8)
    out = torch.empty(n * n, dtype=torch.float32, device=DEVICE)
    _codes_minus_zero_kernel[(1,)](*_dev(q, z), out, bits, dtype, n * n)
    assert torch.equal(out.cpu(), q.float() - z.float())


@triton.jit
def _nibble_floats_kernel(v_ptr, o_ptr, BF16: tl.constexpr, ASM: tl.constexpr, N: tl.constexpr):
    r = tl.program_id(0) * N + tl.arange(0, N)
    f0, f1, f2, f3 = w4a16._nibble_floats(tl.load(v_ptr + r), BF16, ASM)
    total = tl.num_programs(0) * N
    tl.store(o_ptr + r, f0.to(tl.float32))
    tl.store(o_ptr + total + r, f1.to(tl.float32))
    tl.store(o_ptr + 2 * total + r, f2.to(tl.float32))
    tl.store(o_ptr + 3 * total + r, f3.to(tl.float32))


@pytest.mark.parametrize("bf16", [False] + ([True] if DEVICE == "cuda" else []))
def test_nibble_floats_every_int16(bf16):
    """The paired route's dequantization, over all 65536 int16 values and the four nibble positions: MAGIC +
    nibble, exactly. Compiled this runs the inline PTX (two lanes per register); interpreted, its per-element
    twin."""
    from lowbit.kernels.triton import interpreting

    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    magic = 128.0 if bf16 else 1024.0
    out = torch.empty(4, v.numel(), dtype=torch.float32, device=DEVICE)
    _nibble_floats_kernel[(64,)](v.to(DEVICE), out, bf16, not interpreting(), 1024)
    for p in range(4):
        expect = magic + ((v.int() >> (4 * p)) & 0xF).float()
        assert torch.equal(out[p].cpu(), expect), p


def _run_ptx(asm: str, inputs: dict) -> dict:
    """A tiny PTX evaluator for the integer instructions the kernels' inline assembly uses (shr.b32, lop3.b32,
    xor.b32) over uint32 numpy arrays: registers by name, immediates in hex."""
    import numpy as np

    regs = dict(inputs)

    def val(tok):
        return np.uint32(int(tok, 16)) if tok.startswith("0x") else regs[tok]

    for ins in asm.replace("{", " ").replace("}", " ").split(";"):
        parts = ins.replace(",", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, dst, args = parts[0], parts[1], parts[2:]
        if op == "shr.b32":                         # logical shift of a 32-bit register
            regs[dst] = (val(args[0]) >> np.uint32(int(args[1]))).astype(np.uint32)
        elif op == "xor.b32":
            regs[dst] = val(args[0]) ^ val(args[1])
        elif op == "lop3.b32":                      # bit i = lut[(a_i << 2) | (b_i << 1) | c_i]
            a, b, c, lut = val(args[0]), val(args[1]), val(args[2]), int(args[3], 16)
            out = np.zeros_like(a)
            for idx in range(8):
                if (lut >> idx) & 1:
                    sel = [(x if (idx >> (2 - j)) & 1 else ~x) for j, x in enumerate((a, b, c))]
                    out |= sel[0] & sel[1] & sel[2]
            regs[dst] = out
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs


def test_inline_ptx_text():
    """The inline PTX itself, evaluated on the CPU (no GPU runs it in CI):
    - the paired route's nibble floats, over random register pairs of int16 lanes, for fp16 and bf16;
    - W8A8's byte flip, code - 128 as int8 for every byte value, four to a register."""
    import numpy as np

    rng = np.random.default_rng(0)
    v = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    for asm, magic, dtype in ((w4a16._NIBBLES_FP16.value, 1024.0, np.float16),
                              (w4a16._NIBBLES_BF16.value, 128.0, None)):
        regs = _run_ptx(asm, {"$4": v})
        for p in range(4):
            for lane in (0, 1):
                bits = ((regs[f"${p}"] >> np.uint32(16 * lane)) & np.uint32(0xFFFF)).astype(np.uint16)
                if dtype is None:                   # bf16: the high half of a float32
                    got = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
                else:
                    got = bits.view(dtype).astype(np.float32)
                want = magic + ((v >> np.uint32(16 * lane + 4 * p)) & np.uint32(0xF)).astype(np.float32)
                assert np.array_equal(got, want), (asm, p, lane)
    b = np.arange(256, dtype=np.uint32)
    words = b | (b << 8) | (b << 16) | (b << 24)
    flipped = _run_ptx(w8a8._FLIP_BYTES.value, {"$1": words})["$0"]
    for byte in range(4):
        got = ((flipped >> np.uint32(8 * byte)) & np.uint32(0xFF)).astype(np.uint8).view(np.int8)
        assert np.array_equal(got.astype(np.int32), b.astype(np.int32) - 128)


def test_magic_number_floats():
    """The bit identities the dequantization relies on, checked in torch: 0x6400 | c is the fp16 1024 + c for
    c < 1024, and 0x4300 | c is the bf16 128 + c for c < 128."""
    c = torch.arange(256, dtype=torch.int32)
    assert torch.equal((c | 0x6400).to(torch.int16).view(torch.float16).float(), 1024 + c.float())
    c = torch.arange(128, dtype=torch.int32)
    assert torch.equal((c | 0x4300).to(torch.int16).view(torch.bfloat16).float(), 128 + c.float())


def test_wna16_split_k_paths():
    """SPLIT_K = 1 stores into an output that is never zeroed; more splits than K tiles leave programs idle."""
    qw, s, z, b, g = _layer(40, 256, 4, 64, seed=41)
    x = _x(3, 256, seed=42)
    ref = _wna16_ref(x, qw, s, z, b, 4, g, 256)
    for cfg in ({"BN": 32, "BK": 64, "SPLIT_K": 1}, {"BN": 16, "BK": 64, "SPLIT_K": 8}):
        frob, mx = _errors(w4a16.wna16_matmul(*_dev(x, qw, s, z, b), 4, g, 256, config=cfg), ref)
        assert frob < 1e-5 and mx < 1e-5, cfg


def test_split_k_reduction_by_the_last_split():
    """Split-K programs leave fp32 partials and count in at their tile's counter; the last one sums the
    partials in split order and resets the counter. So the counters are all zero after a call, a repeat call
    gives the same bits, and a counter left non-zero (what a lost reset would leave behind) breaks the result:
    the tile is then finished early, from missing partials, or never."""
    qw, s, z, b, g = _layer(40, 256, 4, 64, seed=43)
    x = _x(5, 256, seed=44)
    ref = _wna16_ref(x, qw, s, z, b, 4, g, 256)
    cfg = {"BN": 16, "BK": 32, "SPLIT_K": 4}
    args = (*_dev(x, qw, s, z, b), 4, g, 256)
    y = w4a16.wna16_matmul(*args, config=cfg)
    counters = w4a16._COUNTERS[y.device]
    assert counters.numel() >= 3 and not counters.any()
    assert _errors(y, ref)[1] < 1e-5
    assert torch.equal(w4a16.wna16_matmul(*args, config=cfg), y)
    # New inputs, so stale partials of the last call cannot stand in for missing ones.
    x2 = _x(5, 256, seed=45)
    counters[1] = 2                                 # the second N tile: two splits "already arrived"
    try:
        bad = w4a16.wna16_matmul(*_dev(x2, qw, s, z, b), 4, g, 256, config=cfg)
    finally:
        counters.zero_()
    # The early finish sums workspace memory no split wrote this call: stale values, or NaN from fresh memory.
    err = _errors(bad, _wna16_ref(x2, qw, s, z, b, 4, g, 256))[1]
    assert not err <= 1e-3, err


def test_split_k_pruning():
    from lowbit.kernels.triton.packed import bk_pruner

    # At BM = 64 the tiles that would spill (more than 32 accumulator values a thread) are pruned; at 16 none.
    spill_aware = bk_pruner(max_acc_per_thread=32)
    at16 = spill_aware(w4a16._SPLITK_CONFIGS, {"GROUP": 128, "K": 4096}, BM=16)
    at64 = spill_aware(w4a16._SPLITK_CONFIGS, {"GROUP": 128, "K": 4096}, BM=64)
    assert len(at16) == len(bk_pruner()(w4a16._SPLITK_CONFIGS, {"GROUP": 128, "K": 4096})) > len(at64) > 0
    assert all(64 * c.kwargs["BN"] <= 32 * 32 * c.num_warps for c in at64)


def test_wna16_wrong_weight_fails_tolerance():
    """Negative control: zero points off by one in one group must fail the tolerance used above."""
    qw, s, z, b, g = _layer(40, 256, 4, 64, seed=31)
    x = _x(17, 256, seed=3)
    ref = _wna16_ref(x, qw, s, z, b, 4, g, 256)
    z_bad = z.clone()
    z_bad[:, 1] += 1
    for cfg in (SPLITK, TILED):
        frob, mx = _errors(w4a16.wna16_matmul(*_dev(x, qw, s, z_bad, b), 4, g, 256, config=cfg), ref)
        assert frob > 1e-3 and mx > 1e-3
    # One code off in one row is caught by the max-error bound even when the Frobenius norm barely moves.
    q = unpack_codes(qw, 4, 256)
    q[5, 7] = (q[5, 7] + 1) % 16
    _, mx = _errors(w4a16.wna16_matmul(*_dev(x, pack_codes(q, 4), s, z, b), 4, g, 256, config=TILED), ref)
    assert mx > TOL[torch.float16]


def test_wna16_supports_and_op_fallback():
    """Formats the kernel cannot run are refused by supports(); the op's CUDA kernel then uses the reference."""
    assert not w4a16.supports(3, 64, 576)        # codes straddle bytes
    assert not w4a16.supports(4, 24, 96)         # a K tile of >= 16 would straddle groups
    assert w4a16.supports(4, 24, 24) and w4a16.supports(4, 48, 96)
    import warnings

    ops._FALLBACKS_WARNED.clear()
    for bits, group, k in [(3, 64, 192), (4, 24, 96), (4, 64, 128)]:
        qw, s, z, b, g = _layer(40, k, bits, group, seed=k + bits)
        x = _x(2, 3 * k, seed=1).reshape(2, 3, k)
        # On CPU tensors the CUDA kernel's body runs the interpreted Triton kernel; on a GPU, the dispatcher.
        fn = ops.wna16_linear_triton if DEVICE == "cpu" else torch.ops.lowbit.wna16_linear
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = fn(*_dev(x, qw, s, z, b), bits, g, k)
            fn(*_dev(x, qw, s, z, b), bits, g, k)                   # said once per op and reason
        said = [str(w.message) for w in caught if "reference math" in str(w.message)]
        if bits == 3 or group == 24:
            assert len(said) == 1 and f"{bits}-bit codes in groups of {group}" in said[0], said
        else:
            assert not said
        assert y.shape == (2, 3, 40)
        ref = _wna16_ref(x.reshape(6, k), qw, s, z, b, bits, g, k).reshape(2, 3, 40)
        frob, mx = _errors(y, ref)
        assert frob < 1e-5 and mx < 1e-5


# ---- per-token INT8 quantization ---------------------------------------------------------------------------

def _same_codes(q, s, x):
    q_ref, s_ref = ops.quantize_rows_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_rows_bit_identical(dtype):
    x = (_x(9, 300, seed=4) * 7).to(dtype)
    x[2] = 0                                                     # all-zero row: scale floor 1e-10, codes 0
    for block in (None, 64):                                     # 64: rows walked in five chunks
        _same_codes(*act_quant.quantize_rows(x.to(DEVICE), block=block), x)
    x3 = x[:8].reshape(2, 4, 300)
    q, s = act_quant.quantize_rows(x3.to(DEVICE))
    assert q.shape == (2, 4, 300) and s.shape == (2, 4, 1)


def test_quantize_rows_with_sums():
    x = _x(7, 300, seed=5) * 3
    q, s, sums = act_quant.quantize_rows(x.to(DEVICE), block=64, with_sums=True)
    _same_codes(q, s, x)
    assert sums.dtype == torch.int32 and torch.equal(sums.cpu(), q.cpu().int().sum(1, dtype=torch.int32))


def test_quantize_rows_rounds_half_to_even():
    # max|x| = 127 (and 254): scale 1 (and 2) exactly, so these land exactly on .5 after scaling.
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, -126.5, 127.0])
    x = torch.stack([halves, halves * 2])
    x[1, -1] = 254.0
    q, s = act_quant.quantize_rows(x.to(DEVICE))
    expect = torch.tensor([0, 2, 2, 0, -2, -2, 126, 126, -126, 127], dtype=torch.int8)
    assert torch.equal(q.cpu(), torch.stack([expect, expect])) and s.flatten().tolist() == [1.0, 2.0]
    _same_codes(q, s, x)


def _close_codes(q, s, y_ref, scale_tol, v_tol=1e-4):
    """Codes equal to quantize_rows_int8(y_ref) except by one where y_ref / scale is within rounding (relative
    ``v_tol``) of a .5 boundary: the kernel sums mean and variance in another order than PyTorch, and in half
    precision a last-bit change of the normalizer can flip the rounding of a normalized value to fp16."""
    q_ref, s_ref = ops.quantize_rows_int8(y_ref)
    q, s = q.cpu(), s.cpu()
    assert float(((s - s_ref).abs() / s_ref).max()) <= scale_tol
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1
    v = y_ref.float() / s_ref
    near_half = ((v - v.floor()) - 0.5).abs() < v_tol * v.abs().clamp_min(1)
    assert bool((near_half | (diff == 0)).all())
    assert int((diff != 0).sum()) <= max(1, q.numel() // 100)


# bf16 on a GPU only: the interpreter converts float32 to bf16 by truncation, not rounding to nearest even.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_rmsnorm_quantize_exact_on_exact_sums(dtype):
    """Integer-valued inputs make every sum exact in any order: then the fused kernel is bit-identical."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randint(-64, 65, (6, 256), generator=gen).float() / 4).to(dtype)
    w = (1 + torch.randn(256, generator=gen) * 0.1).to(dtype)
    for block in (None, 64):
        q, s = act_quant.rmsnorm_quantize(x.to(DEVICE), w.to(DEVICE), 1e-6, block=block)
        _same_codes(q, s, ops.rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype,scale_tol,v_tol", [(torch.float32, 1e-6, 1e-4), (torch.float16, 2**-10, 2**-9)])
def test_rmsnorm_quantize_random(dtype, scale_tol, v_tol):
    x = (_x(16, 200, seed=9) * 3 + 0.5).to(dtype)
    w = (1 + _x(1, 200, seed=10)[0] * 0.2).to(dtype)
    q, s = act_quant.rmsnorm_quantize(x.to(DEVICE), w.to(DEVICE), 1e-5, block=64)
    _close_codes(q, s, ops.rms_norm_reference(x, w, 1e-5), scale_tol, v_tol)


def test_layernorm_quantize_random():
    x = _x(16, 200, seed=12) * 3 + 2.0                  # offset rows: the mean matters
    w, b = 1 + _x(1, 200, seed=13)[0] * 0.2, _x(1, 200, seed=14)[0] * 0.1
    ref = F.layer_norm(x, (200,), w, b, 1e-5)
    for block in (None, 64):
        q, s = act_quant.layernorm_quantize(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 1e-5, block=block)
        _close_codes(q, s, ref, 1e-5)
    q, s = act_quant.layernorm_quantize(x.to(DEVICE), w.to(DEVICE), None, 1e-5)
    _close_codes(q, s, F.layer_norm(x, (200,), w, None, 1e-5), 1e-5)


def test_rmsnorm_quant_int8_op():
    x = (_x(6, 128, seed=15) * 2).reshape(2, 3, 128)
    w = 1 + _x(1, 128, seed=16)[0] * 0.1
    q_ref, s_ref = torch.ops.lowbit.rmsnorm_quant_int8(x, w, 1e-6)      # CPU: the reference kernel
    assert q_ref.shape == (2, 3, 128) and s_ref.shape == (2, 3, 1) and q_ref.dtype == torch.int8
    fn = ops.rmsnorm_quant_int8_triton if DEVICE == "cpu" else torch.ops.lowbit.rmsnorm_quant_int8
    q, s = fn(*_dev(x, w), 1e-6)
    _close_codes(q.reshape(6, 128), s.reshape(6, 1), ops.rms_norm_reference(x, w, 1e-6).reshape(6, 128), 1e-6)
    torch.library.opcheck(torch.ops.lowbit.rmsnorm_quant_int8.default, (x, w, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2**-10)])
def test_act_mul_matches_reference(act, dtype, tol):
    y = (_x(5, 2 * 150, seed=17) * 3).to(dtype).reshape(5, 1, 300)
    ref = ops.act_mul_reference(y, act)
    out = act_quant.act_mul(y.to(DEVICE), act, block=64)          # 64: three column programs per row
    assert out.shape == (5, 1, 150) and out.dtype == dtype
    err = ((out.cpu().float() - ref.float()).abs() / ref.float().abs().clamp_min(1)).max()
    assert float(err) <= tol
    # Negative control: gate and up swapped is far off.
    swapped = act_quant.act_mul(torch.cat([y[..., 150:], y[..., :150]], -1).to(DEVICE), act)
    assert float((swapped.cpu().float() - ref.float()).abs().max()) > 0.1


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_act_mul_quantize_codes(act):
    y = _x(12, 2 * 200, seed=18) * 3
    ref = ops.act_mul_reference(y, act)
    for block in (None, 64):                                      # 64: rows walked in four chunks
        q, s = act_quant.act_mul_quantize(y.to(DEVICE), act, block=block)
        assert q.shape == (12, 200) and s.shape == (12, 1)
        _close_codes(q, s, ref, 1e-6)


def test_gated_and_codes_ops_on_the_kernels():
    """The CUDA registrations of act_mul, act_mul_quant_int8, layernorm_quant_int8 and w8a8_linear_codes run the
    kernels (called directly without a GPU) and agree with the CPU reference ops."""
    cuda = DEVICE == "cuda"
    y = (_x(6, 256, seed=19) * 2).reshape(2, 3, 256)
    fn = torch.ops.lowbit.act_mul if cuda else ops.act_mul_triton
    assert float((fn(*_dev(y), "silu").cpu() - torch.ops.lowbit.act_mul(y, "silu")).abs().max()) < 1e-5
    fn = torch.ops.lowbit.act_mul_quant_int8 if cuda else ops.act_mul_quant_int8_triton
    q, s = fn(*_dev(y), "gelu_tanh")
    assert q.shape == (2, 3, 128) and s.shape == (2, 3, 1)
    _close_codes(q.reshape(6, 128), s.reshape(6, 1), ops.act_mul_reference(y, "gelu_tanh").reshape(6, 128), 1e-6)
    x = _x(6, 128, seed=20).reshape(2, 3, 128) + 1.0
    fn = torch.ops.lowbit.layernorm_quant_int8 if cuda else ops.layernorm_quant_int8_triton
    for w in (None, 1 + _x(1, 128, seed=21)[0] * 0.1):
        q, s = fn(*_dev(x), None if w is None else w.to(DEVICE), None, 1e-5)
        _close_codes(q.reshape(6, 128), s.reshape(6, 1), F.layer_norm(x, (128,), w, None, 1e-5).reshape(6, 128),
                     1e-5)
    qw, sw, z, b, g = _layer(40, 128, 8, 32, seed=22, sym=True)
    xq, sx = ops.quantize_rows_int8(x)
    ref = ops.w8a8_linear_codes_reference(xq, sx, qw, sw, z, b, 8, g, 128, torch.float32).double()
    fn = torch.ops.lowbit.w8a8_linear_codes if cuda else ops.w8a8_linear_codes_triton
    out = fn(*_dev(xq, sx, qw, sw, z, b), 8, g, 128, torch.float32)
    assert out.shape == (2, 3, 40) and _errors(out, ref)[1] < 1e-6
    z[:, 1] += 1                                                  # negative control: one group's zero off by one
    assert _errors(fn(*_dev(xq, sx, qw, sw, z, b), 8, g, 128, torch.float32), ref)[1] > 1e-4


# ---- W8A8 / W4A8 -------------------------------------------------------------------------------------------

def _signed(qw, z, bits, k, g):
    return ops.signed_weight(qw, z, bits, k, g).long()


@pytest.mark.parametrize("bits,group,k", [(8, 0, 256), (8, 64, 256), (4, 32, 192), (4, 0, 200)])
def test_w8a8_int32_accumulators_exact(bits, group, k):
    """Scales of one: the fp32 output is the sum of the int32 group accumulators, exact below 2^24."""
    qw, _, z, _, g = _layer(40, k, bits, group, seed=k + bits, sym=True)
    gen = torch.Generator().manual_seed(2)
    xq = torch.randint(-127, 128, (17, k), generator=gen, dtype=torch.int8)
    ones = torch.ones(40, z.shape[1], dtype=torch.float16)
    exact = (xq.long() @ _signed(qw, z, bits, k, g).t()).double()
    assert exact.abs().max() < 2**24
    for swap in (False, True):                  # the plain and the transposed (Hopper) product
        y = w8a8.w8a8_matmul(*_dev(xq, torch.ones(17, 1), qw, ones, z, None), bits, g, k, torch.float32,
                             config={**TILED, "SWAP": swap})
        assert torch.equal(y.cpu().double(), exact), swap


def test_w8a8_per_channel_zero_point_correction():
    """8-bit per-channel weights go through the dot as code - 128 and get (128 - zero) * row sum back in the
    epilogue: exact for any zero point for which code - zero fits int8 (the reference's domain)."""
    gen = torch.Generator().manual_seed(71)
    n, k = 40, 192
    z = torch.randint(100, 156, (n, 1), generator=gen, dtype=torch.int16)
    q = (z + torch.randint(-120, 121, (n, k), generator=gen, dtype=torch.int16)).clamp(0, 255).to(torch.uint8)
    qw = pack_codes(q, 8)
    xq = torch.randint(-127, 128, (9, k), generator=gen, dtype=torch.int8)
    ones = torch.ones(n, 1, dtype=torch.float16)
    exact = (xq.long() @ (q.long() - z.long()).t()).double()
    for sums, swap in ((None, False), (xq.int().sum(1), True)):     # row sums computed by the launcher, or given
        y = w8a8.w8a8_matmul(*_dev(xq, torch.ones(9, 1), qw, ones, z.to(torch.uint8), None), 8, k, k,
                             torch.float32, config={**TILED, "SWAP": swap},
                             x_sums=None if sums is None else sums.to(DEVICE))
        assert torch.equal(y.cpu().double(), exact)


@pytest.mark.parametrize("bits,group,n,k", [(8, 0, 40, 256), (8, 32, 72, 256), (8, 64, 40, 200),
                                            (8, 128, 72, 256), (4, 32, 40, 192), (4, 0, 72, 100)])
def test_w8a8_matches_reference(bits, group, n, k):
    qw, s, z, b, g = _layer(n, k, bits, group, seed=bits * 100 + k + group, sym=True)
    assert w8a8.supports(bits, g, k)
    for m in MS:
        x = _x(m, k, seed=m + 40) * 4
        bias = b if m in (1, 17) else None
        ref = ops.w8a8_linear_reference(x, qw, s, z, bias, bits, g, k).double()
        for cfg in (TILED, {"BM": 32, "BN": 64, "BK": 128}, {"BM": 16, "BN": 32, "BK": 64, "SWAP": True}):
            y = w8a8.w8a8_linear(*_dev(x, qw, s, z, bias), bits, g, k, config=cfg)
            assert y.dtype == torch.float32
            assert _errors(y, ref)[1] < 1e-6, (m, cfg)


def test_w8a8_half_output_and_default_config():
    qw, s, z, b, g = _layer(72, 256, 8, 64, seed=51, sym=True)
    x = _x(33, 256, seed=52).half()
    ref = ops.w8a8_linear_reference(x, qw, s, z, b, 8, g, 256)
    y = w8a8.w8a8_linear(*_dev(x, qw, s, z, b), 8, g, 256)
    assert y.dtype == torch.float16
    assert _errors(y, ref.double())[1] < 2e-3


def test_w8a8_wrong_weight_fails_and_fallback():
    qw, s, z, b, g = _layer(40, 128, 8, 32, seed=61, sym=True)
    x = _x(3, 128, seed=62)
    ref = ops.w8a8_linear_reference(x, qw, s, z, b, 8, g, 128).double()
    z_bad = z.clone()
    z_bad[:, 2] += 1
    y = w8a8.w8a8_linear(*_dev(x, qw, s, z_bad, b), 8, g, 128, config=TILED)
    assert _errors(y, ref)[1] > 1e-4
    # Groups of 16 are too small for an int8 dot's K tile: refused, and the op computes the reference instead.
    assert not w8a8.supports(8, 16, 64) and not w8a8.supports(8, 48, 96) and w8a8.supports(8, 16, 16)
    for group, k in [(16, 64), (32, 128)]:
        qw, s, z, b, g = _layer(40, k, 8, group, seed=63, sym=True)
        x = _x(4, k, seed=64).reshape(2, 2, k)
        fn = ops.w8a8_linear_triton if DEVICE == "cpu" else torch.ops.lowbit.w8a8_linear
        y = fn(*_dev(x, qw, s, z, b), 8, g, k)
        ref = ops.w8a8_linear_reference(x, qw, s, z, b, 8, g, k).double()
        assert y.shape == (2, 2, 40)
        assert _errors(y, ref)[1] < 1e-6


def test_residual_epilogues():
    """The residual added in the GEMMs' epilogue (split-K's last split, the tiled and the W8A8 kernels, and the
    ops' CUDA paths) equals linear + residual; the same launch without it misses by the residual."""
    qw, s, z, b, g = _layer(48, 256, 4, 64, seed=70)
    x, r = _x(5, 256, seed=71), _x(5, 48, seed=72) * 4
    ref = _wna16_ref(x, qw, s, z, b, 4, g, 256) + r.double()
    for cfg in (SPLITK, TILED):
        y = w4a16.wna16_matmul(*_dev(x, qw, s, z, b), 4, g, 256, config=cfg, residual=r.to(DEVICE))
        assert _errors(y, ref)[1] < 1e-5
        assert _errors(w4a16.wna16_matmul(*_dev(x, qw, s, z, b), 4, g, 256, config=cfg), ref)[1] > 0.1
    fn = ops.wna16_linear_triton if DEVICE == "cpu" else torch.ops.lowbit.wna16_linear
    y = fn(*_dev(x.reshape(5, 1, 256), qw, s, z, b), 4, g, 256, r.reshape(5, 1, 48).to(DEVICE))
    assert y.shape == (5, 1, 48) and _errors(y.reshape(5, 48), ref)[1] < 1e-5
    qw, s, z, b, g = _layer(48, 256, 8, 0, seed=73, sym=True)
    ref = ops.w8a8_linear_reference(x, qw, s, z, b, 8, g, 256).double() + r.double()
    assert _errors(ops.w8a8_linear_reference(x, qw, s, z, b, 8, g, 256, r), ref)[1] < 1e-6
    y = w8a8.w8a8_linear(*_dev(x, qw, s, z, b), 8, g, 256, config=TILED, residual=r.to(DEVICE))
    assert _errors(y, ref)[1] < 1e-5
    assert _errors(w8a8.w8a8_linear(*_dev(x, qw, s, z, b), 8, g, 256, config=TILED), ref)[1] > 0.1


def test_import_lowbit_does_not_import_triton():
    code = "import sys, lowbit, lowbit.ops, lowbit.kernels.triton; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_bench_dry_run(tmp_path):
    """bench.kernels runs every code path (correctness gates, baselines, tables, JSON) on tiny CPU shapes
    in the interpreter, so a GPU session's few minutes are not lost to a broken script."""
    import json
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--dry-run", "--markdown", "--json",
                          str(tmp_path / "k.json")], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "k.json").read_text())
    assert [r["M"] for r in rows["w4a16"]] == [1, 16, 80] and [r["M"] for r in rows["w8a8"]] == [16, 80]
    assert "| N | K | M |" in out.stdout


def test_in_flight_model_parts():
    """The pieces of compile_check's bytes-in-flight model: load widths read off SASS, and resident programs
    as the tightest of an SM's registers (per-warp units of 256), shared memory (+1 KiB a block), warp and
    block slots."""
    from lowbit.kernels.triton.sass import _load_bytes, resident_programs

    loop = ["LDGSTS.E.BYPASS.128 [R98+0x200], desc[UR12][R10.64], P5", "@!P4 LDG.E.U16 R40, desc[UR12][R44.64]",
            "LDG.E R1, desc[UR4][R2.64]", "@P0 LDG.E.64 R4, desc[UR4][R6.64]", "LDS.128 R40, [R26+UR7+0x4800]"]
    assert _load_bytes(loop, "LDGSTS") == 16 and _load_bytes(loop, "LDG") == 2 + 4 + 8
    assert resident_programs(90, 168, 73728, 4) == 3            # registers and shared memory both allow 3
    assert resident_programs(90, 32, 0, 1) == 32                # block slots
    assert resident_programs(86, 32, 0, 4) == 12                # warp slots (48)
    assert resident_programs(80, 255, 1024, 8) == 1             # 255 -> 256 registers a thread: 8 warps fill it


@pytest.mark.slow
def test_kernels_compile_for_sm80_sm86_sm90(tmp_path):
    """Every kernel variant (two autotuning configs per hot path) compiles to a cubin for A100, A6000 and H100
    class GPUs and fits their shared memory: Triton's compiler needs no GPU for that, so CI catches what the
    interpreter cannot (lowering, layouts, resources). The full sweep: python -m lowbit.kernels.triton.compile_check

    The hot loops are also held to their machine-code budgets, a static proxy for speed, not a timing:
    - W4A16 at M = 1: no int -> float conversions (a quarter-rate pipe), no register spills, at most 9
      instructions per weight in any config and under 5 in the best (4.4 to 7.8 as built; 9.2 to 11.6 plus a
      conversion per weight before the magic-number floats, the transposed product and the paired route).
    - W8A8 per-channel: at most 4 instructions per weight of the tile (2 to 3 as built, the loads, one xor per
      four weights and the MMAs; 5 to 15 when every byte was unpacked, widened and repacked).
    - W4A16 at M = 1 on sm90 keeps its weight stream fed: on each of the issue's shapes some config prefetches
      (cp.async) at least 24 KiB per SM, about what an H100's 3.0 TB/s needs over an assumed 1 us of loaded
      latency (Little's law: 3 MB in flight over 132 SMs). 47 to 66 KiB as built.
    """
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows_json = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "-m", "lowbit.kernels.triton.compile_check", "--quick", "--sass",
                          "--json", str(rows_json)], env=env, capture_output=True, text=True, timeout=600)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and "0 failed, 0 over the shared-memory limit" in last, \
        out.stdout[-3000:] + out.stderr[-2000:]
    decode = [r for r in json.loads(rows_json.read_text()) if r["label"] == "w4a16 split-K, M=1"]
    assert len(decode) == 2 * 3
    for r in decode:
        p = r["sass"]
        assert p["cvt"] < 0.1 and p["spill_bytes"] == 0 and p["per_weight"] < 9 and p["mma"] > 0, r
    for arch in (80, 86, 90):
        assert min(r["sass"]["per_weight"] for r in decode if r["arch"] == arch) < 5, arch
    for shape in decode[0]["in_flight_kib"]:
        assert max(r["in_flight_kib"][shape] for r in decode if r["arch"] == 90) >= 24, (shape, decode)
    prefill = [r for r in json.loads(rows_json.read_text()) if r["label"] == "w8a8"]
    assert len(prefill) == 2 * 3
    for r in prefill:
        p = r["sass"]
        assert p["spill_bytes"] == 0 and p["per_weight"] < 4 and p["mma"] > 0, r
