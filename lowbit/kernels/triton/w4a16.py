"""Weight-only quantized GEMM: ``y[M, N] = x[M, K] @ dequant(W).T + bias`` with W read as stored.

W is lowbit's packed layout (codes uint8 [N, ceil(K*bits/8)], scales fp16 [N, G], zeros uint8 [N, G], group j =
columns [j*g, min((j+1)*g, K))), bits 2, 4 or 8; activations fp16, bf16 or fp32, output in x's dtype.

One kernel, two launch shapes:

- split-K (decode, M <= 64): a [BM=16..64, BN] output tile per program and SPLIT_K programs along K, each
  over a contiguous run of K tiles. At small M the kernel is a weight stream; splitting K puts enough programs
  (and bytes) in flight to keep every SM reading. With SPLIT_K > 1 each program writes its fp32 partial sum
  to a workspace and counts itself in at its tile's counter; the last to arrive adds the SPLIT_K partials in
  split order, adds the bias (and the residual), rounds once to x's dtype and stores, then sets the counter back to zero for the
  next launch. So a decode step is one kernel launch: no memset before it (at decode sizes a memset launch
  would cost a good share of the GEMM's own time) and no cast after it. The result does not depend on which
  split finishes first, so it is the same bits on every run. The counters live in one zeroed int32 buffer per device
  (``_tile_counters``), made by the first call: split-K launches on two streams of one device at the same
  time would share it, so they are meant for one stream (or one CUDA graph) at a time.
- tiled (prefill, M > 64): [BM, BN] tiles over the whole K, grouped along M so a weight tile is dequantized
  for GROUP_M row tiles while it is in L2; bias, residual and the cast fused in the epilogue.

Both compute the product transposed, ``y.T = W @ x.T``: the dequantized weight tile is the dot's first operand,
K-major as stored, which mma.sync and Hopper's wgmma take from registers, so only the small x tile is staged
through shared memory. BM, the dot's N, can then be as small as 16 at decode.

Dequantization is exact and cheap: ``q - z`` (an integer below 2^8) is formed in fp16 as (1024 + q) - (1024 + z)
from the bit patterns 0x6400 | q and 0x6400 | z, an OR each instead of an int -> float conversion, which
issues at a quarter of the integer rate or less and would otherwise bound the kernel at decode (bf16 uses
0x4300 | c = 128 + c for 2- and 4-bit codes). 4-bit weights in fp16/bf16 (the decode hot path) go further,
on the paired route: rows are read as int16, and one shift and one lop3 of inline PTX turn a 32-bit register
into two floats, one from each int16 lane; the tile is laid out so those two sit side by side in K, which is
the pair an MMA operand register holds, and the x tile is permuted to the same K order (a dot does not care
about the order of K). That takes the decode loop from about 9-11 machine instructions per weight to about
3.3 with 128 weights per thread, under what H100's memory bandwidth allows (about 5 at 3 TB/s and 132 SMs
issuing 4 a clock).

A tile computes ``(q - z) @ x`` on tensor cores with fp32 accumulation, and the fp16 scale multiplies the fp32
partial sum of its group once, at the group's last tile (a K tile never straddles two groups: BK divides g).
Per-channel weights (g >= K) scale once in the epilogue. Nothing is rounded to 16 bits before the accumulator,
unlike kernels that form ``(q - z) * s`` in fp16.

``python -m lowbit.kernels.triton.compile_check --sass`` prints what the main loop costs per weight in
machine instructions for every config, without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import interpreting, next_pow2
from lowbit.kernels.triton.packed import SUPPORTED_BITS, TL_DTYPES, bk_pruner, fit_bk, load_codes, output_tile, \
    packed_view, store_dtype, with_even_k

SPLIT_K_MAX_M = 64          # M at or below this takes the split-K path


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether these kernels can run a weight of this format (else the op falls back to the reference)."""
    if bits not in SUPPORTED_BITS or in_features <= 0 or group_size <= 0:
        return False
    return group_size >= in_features or group_size % 16 == 0


@triton.jit
def _magic_floats(c, BF16: tl.constexpr):
    """MAGIC + c from the bits MAGIC | c, with no int -> float conversion: fp16 0x6400 | c = 1024 + c (c < 1024)
    or bf16 0x4300 | c = 128 + c (c < 128)."""
    if BF16:
        return (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _codes_minus_zero(q, z, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``q - z`` (int32 codes and zero points, both below 2^BITS) as DOT_DTYPE, exactly.

    int -> float conversions issue at a quarter of the integer rate or less, and at decode sizes every weight
    needs one, so fp16 takes the magic-number route instead: the bits 0x6400 | c are the fp16 number 1024 + c
    for any c < 1024, so one OR and a 16-bit reinterpretation make 1024 + q and 1024 + z, and their fp16
    difference is q - z with no rounding. bf16 does the same with 0x4300 | c = 128 + c, exact for c < 128
    (2- and 4-bit codes); 8-bit codes in bf16, and fp32, convert.
    """
    if (DOT_DTYPE == tl.float16) or ((DOT_DTYPE == tl.bfloat16) and (BITS <= 4)):
        return _magic_floats(q, DOT_DTYPE == tl.bfloat16) - _magic_floats(z, DOT_DTYPE == tl.bfloat16)
    else:
        return (q - z).to(DOT_DTYPE)


def _nibbles_asm(magic: int) -> str:
    """PTX for four nibble positions of two int16 lanes at once: (v >> 4p) & 0x000F000F | magic, p = 0..3."""
    lop = "lop3.b32 {out}, {src}, 0x000F000F, " + f"0x{magic:08X}" + ", 0xea;"    # 0xea: (a & b) | c
    body = [lop.format(out="$0", src="$4")]
    for p in (1, 2, 3):
        body += [f"shr.b32 t, $4, {4 * p};", lop.format(out=f"${p}", src="t")]
    return "{.reg .b32 t; " + " ".join(body) + "}"


_NIBBLES_FP16 = tl.constexpr(_nibbles_asm(0x64006400))      # 0x6400 | c = fp16 1024 + c
_NIBBLES_BF16 = tl.constexpr(_nibbles_asm(0x43004300))      # 0x4300 | c = bf16 128 + c


@triton.jit
def _nibble_floats(v, BF16: tl.constexpr, ASM: tl.constexpr):
    """MAGIC + nibble p (bits 4p..4p+3) of each int16 of v, for p = 0..3: four tensors of fp16 (MAGIC 1024) or
    bf16 (MAGIC 128).

    Compiled (ASM), two int16 lanes share a 32-bit register, and one shift and one lop3 make two floats at
    once: under half an instruction per weight. The lanes never mix (the shift's spill from the high lane
    into the low one is masked off), so the result is elementwise whichever two elements Triton packs
    together. The interpreter, which cannot run PTX, computes the same per element.
    """
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise(_NIBBLES_BF16, "=r,=r,=r,=r,r", [v], is_pure=True, pack=2,
                                             dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16))
        else:
            return tl.inline_asm_elementwise(_NIBBLES_FP16, "=r,=r,=r,=r,r", [v], is_pure=True, pack=2,
                                             dtype=(tl.float16, tl.float16, tl.float16, tl.float16))
    else:
        w = v.to(tl.int32)
        return (_magic_floats(w & 0xF, BF16), _magic_floats((w >> 4) & 0xF, BF16),
                _magic_floats((w >> 8) & 0xF, BF16), _magic_floats((w >> 12) & 0xF, BF16))


@triton.jit
def _load_nibbles_paired(w_ptr, rn, n_mask, k0, KP16, stride_wn, BN: tl.constexpr, BK: tl.constexpr,
                         EVEN_K: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """4-bit codes of columns k0..k0+BK as MAGIC + code floats [BN, BK], in the paired K order (see
    ``_paired_x``): the row is read as int16 (four codes each), and each nibble position becomes a tensor of
    floats whose registers already hold the two lanes of one 32-bit word; laying the tile out as
    [word, nibble, lane] keeps those pairs adjacent, which is the pair an MMA operand register takes."""
    re = k0 // 4 + tl.arange(0, BK // 4)
    ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + re[None, :]
    if EVEN_K:
        v = tl.load(ptrs, mask=n_mask[:, None], other=0)
    else:
        v = tl.load(ptrs, mask=n_mask[:, None] & (re[None, :] < KP16), other=0)
    f0, f1, f2, f3 = _nibble_floats(v, BF16, ASM)
    f = tl.join(tl.join(f0, f2), tl.join(f1, f3))               # [BN, BK/4, 2, 2]: nibble 2a + b at [.., a, b]
    f = tl.permute(tl.reshape(f, (BN, BK // 8, 2, 4)), (0, 1, 3, 2))                         # [word, nibble, lane]
    return tl.reshape(f, (BN, BK))


@triton.jit
def _paired_x(xt, BK: tl.constexpr, BM: tl.constexpr):
    """The x tile [BK, BM] in the paired K order: position 8w + 2p + h holds column 8w + 4h + p (nibble p of
    int16 lane h of word w). A dot over K does not care about the order, only that both operands share it."""
    return tl.reshape(tl.permute(tl.reshape(xt, (BK // 8, 2, 4, BM)), (0, 2, 1, 3)), (BK, BM))


@triton.jit
def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr,
                  M, N, K, KP, GROUP, M_BUCKET,
                  stride_xm, stride_xk, stride_wn, stride_sn, stride_zn, stride_rm, stride_ym, stride_wsk,
                  BITS: tl.constexpr, PER: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr,
                  EVEN_K: tl.constexpr, PAIRED: tl.constexpr, ASM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The product is computed transposed, y.T tile [BN, BM] = W tile [BN, BK] @ x.T tile [BK, BM]: the
    # dequantized weight is the dot's first operand, which tensor-core MMAs (wgmma included) take straight
    # from registers, K-major as stored; only the small x tile goes through shared memory.
    rm, rn, m_mask, n_mask = output_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)
    rk = tl.arange(0, BK)
    x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm

    # This program's K tiles: a contiguous run, so each weight row is read as one stretch.
    n_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    part = tl.zeros((BN, BM), dtype=tl.float32)        # the current group's sum, before its scale
    if ONE_GROUP:
        z = tl.load(z_ptr + rn * stride_zn, mask=n_mask, other=0).to(tl.int32)
    for t in range(t_lo, t_hi):
        k0 = t * BK
        rk0 = k0 + rk
        if EVEN_K:
            xt = tl.load(x_cols + rk0[:, None] * stride_xk, mask=m_mask[None, :], other=0.0)
        else:
            xt = tl.load(x_cols + rk0[:, None] * stride_xk, mask=m_mask[None, :] & (rk0[:, None] < K), other=0.0)
        xt = xt.to(DOT_DTYPE)
        if not ONE_GROUP:
            z = tl.load(z_ptr + rn * stride_zn + k0 // GROUP, mask=n_mask, other=0).to(tl.int32)
        # Columns past K load x = 0, so whatever their codes decode to contributes nothing.
        if PAIRED:
            # 4-bit codes in fp16/bf16: MAGIC + code floats minus MAGIC + zero (see _codes_minus_zero), in the
            # paired K order, so x takes the same order.
            f = _load_nibbles_paired(w_ptr, rn, n_mask, k0, KP, stride_wn, BN, BK, EVEN_K,
                                     DOT_DTYPE == tl.bfloat16, ASM)
            w = f - _magic_floats(z, DOT_DTYPE == tl.bfloat16)[:, None]
            xt = _paired_x(xt, BK, BM)
        else:
            q = load_codes(w_ptr, rn, n_mask, k0, KP, stride_wn, BITS, PER, BK, BN, EVEN_K)
            w = _codes_minus_zero(q, z[:, None], BITS, DOT_DTYPE)
        part = tl.dot(w, xt, part, input_precision=DOT_PRECISION)
        if not ONE_GROUP:
            # Scale the group's sum at its last tile (or the last tile of this split, mid-group).
            if ((k0 + BK) % GROUP == 0) | (t == t_hi - 1):
                s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
                acc += part * s[:, None]
                part = tl.zeros((BN, BM), dtype=tl.float32)
    if ONE_GROUP:
        s = tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        acc = part * s[:, None]

    mask = m_mask[None, :] & n_mask[:, None]
    if SPLIT_K > 1:
        # Publish this split's partial, then count in at the tile's counter. The barrier puts every thread's
        # stores before the (one) release of the counter; the last program to arrive acquires them all, reads
        # them past L1 (.cg) and finishes the tile, in split order, so the sum is the same whoever is last.
        ws_tile = ws_ptr + rm.to(tl.int64)[None, :] * N + rn[:, None]
        tl.store(ws_tile + pid_k * stride_wsk, acc, mask=mask, cache_modifier=".cg")
        tl.debug_barrier()
        counter = cnt_ptr + tl.program_id(0)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                acc += tl.load(ws_tile + j * stride_wsk, mask=mask, other=0.0, cache_modifier=".cg")
            _store_tile(acc, b_ptr, r_ptr, y_ptr, rm, rn, n_mask, mask, stride_rm, stride_ym, HAS_BIAS, HAS_RES)
            tl.store(counter, 0)                # zero again for the next launch
    else:
        _store_tile(acc, b_ptr, r_ptr, y_ptr, rm, rn, n_mask, mask, stride_rm, stride_ym, HAS_BIAS, HAS_RES)


@triton.jit
def _store_tile(acc, b_ptr, r_ptr, y_ptr, rm, rn, n_mask, mask, stride_rm, stride_ym, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr):
    """The transposed tile acc [BN, BM] plus bias plus the residual r [M, N], rounded once to y's dtype, into
    y [M, N]."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        acc += tl.load(r_ptr + rm.to(tl.int64)[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0
                       ).to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _cfg(bn, bk, warps, stages, bm=None, split_k=None, group_m=8):
    kw = {"BN": bn, "BK": bk, "GROUP_M": group_m}
    if bm is not None:
        kw["BM"] = bm
    if split_k is not None:
        kw["SPLIT_K"] = split_k
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Decode: weight-streaming, so wide K tiles (long coalesced row reads) and enough programs to keep every SM
# reading. 128 weights per thread per K tile (BN * BK / threads) halves the loop's per-weight overhead against
# 64 (3.3 against 4.5 machine instructions per weight at M <= 16; compile_check --sass), so small-warp tiles
# are offered beside the 4-warp ones, which keep their accumulators in registers up to BM = 64.
# BM is not tuned: the launcher sets it to the next power of two >= M (16..64).
_SPLITK_CONFIGS = [
    _cfg(32, 128, 1, 4, split_k=4), _cfg(32, 128, 1, 4, split_k=8), _cfg(64, 128, 2, 4, split_k=2),
    _cfg(64, 128, 2, 4, split_k=4), _cfg(128, 128, 4, 4, split_k=1), _cfg(128, 128, 4, 4, split_k=2),
    _cfg(64, 128, 2, 6, split_k=1),
    _cfg(32, 128, 4, 4, split_k=4), _cfg(64, 128, 4, 4, split_k=4), _cfg(64, 64, 4, 4, split_k=8),
    _cfg(128, 64, 4, 3, split_k=4), _cfg(64, 128, 4, 3, split_k=2), _cfg(128, 128, 8, 3, split_k=2),
    _cfg(64, 128, 4, 4, split_k=1),
]
# Prefill: compute-bound tiles. Each holds two fp32 accumulators (the sum so far and the current group's), so
# the tiles kept are those that spill nothing on sm90 and at most 48 bytes on sm80/sm86 (compile_check --sass).
_TILED_CONFIGS = [
    _cfg(128, 64, 8, 3, bm=128), _cfg(256, 64, 8, 3, bm=64), _cfg(64, 128, 4, 3, bm=64),
    _cfg(64, 128, 8, 3, bm=128), _cfg(128, 64, 4, 4, bm=64),
]
_KEY = ["M_BUCKET", "N", "K", "GROUP", "BITS", "PER"]
_wna16 = with_even_k(_wna16_kernel)
# Split-K tiles whose two fp32 accumulators would put more than 2 x 32 values on a thread at this M spill (the
# 1- and 2-warp tiles at BM = 64): pruned per M bucket.
_splitk_tuned = triton.autotune(_SPLITK_CONFIGS, key=_KEY,
                                prune_configs_by={"early_config_prune": bk_pruner(max_acc_per_thread=32)})(_wna16)
_tiled_tuned = triton.autotune(_TILED_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": bk_pruner()})(_wna16)

# Under the interpreter: one fixed config per path (autotuning would time numpy).
_INTERPRET_SPLITK = {"BN": 32, "BK": 64, "SPLIT_K": 2}
_INTERPRET_TILED = {"BM": 32, "BN": 32, "BK": 64}


_SPLIT_K_MAX = max(c.kwargs["SPLIT_K"] for c in _SPLITK_CONFIGS)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The split-K tile counters of ``device``: int32, zero between launches (each launch's last program per
    tile resets its counter), at least ``tiles`` of them.

    One buffer per device, made zeroed by the first call, which is outside any CUDA graph: autotuning needs an
    eager warm-up call before capture anyway. A capture that finds none, or too few, makes its own inside the
    graph, so its memset is replayed with it, and does not keep it (its memory belongs to the graph).
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _COUNTERS[device] = buf
    return buf


def wna16_matmul(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 config: dict | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ dequant(W).T + bias (+ residual [M, N])`` -> [M, N] in x2d's dtype.

    ``config`` forces one kernel config instead of autotuning: a dict of BN, BK, BM and optionally SPLIT_K,
    GROUP_M, num_warps, num_stages. With SPLIT_K (any value) it runs the split-K path, else the tiled one.
    BK is lowered where needed so a K tile stays within one group.
    """
    m, k = x2d.shape
    n = qweight.shape[0]
    if k != in_features or not supports(bits, group_size, in_features):
        raise ValueError(f"wna16_matmul: unsupported bits={bits} group={group_size} K={in_features} (x K={k})")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"wna16_matmul: activations must be fp16, bf16 or fp32, got {x2d.dtype}")
    if m == 0:
        return x2d.new_empty((0, n))
    # Tensor-core dots in x's dtype. fp32 activations: full-precision products, not TF32 (tl.dot's default).
    # The interpreter mishandles bf16 dots and int->bf16 casts, so there bf16 tiles are widened to fp32 (exact:
    # bf16 values and small integers multiply exactly in fp32); compiled kernels keep bf16.
    dot_dtype = tl.float32 if x2d.dtype == torch.float32 or (x2d.dtype == torch.bfloat16 and interpreting()) \
        else TL_DTYPES[x2d.dtype]
    wq, per = packed_view(qweight, bits)
    # 4-bit words in fp16/bf16 dots take the paired route (_load_nibbles_paired), reading the rows as int16.
    paired = bits == 4 and per == 8 and dot_dtype != tl.float32
    if paired:
        wq = wq.view(torch.int16)
    scales, zeros = scales.contiguous(), zeros.contiguous()        # the kernel assumes unit stride along G
    bias = None if bias is None else bias.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    one_group = group_size >= k
    if config is None and interpreting():
        config = dict(_INTERPRET_SPLITK if m <= SPLIT_K_MAX_M else _INTERPRET_TILED)
    out = torch.empty((m, n), device=x2d.device, dtype=store_dtype(x2d.dtype))
    split_path = config.get("SPLIT_K", 1) > 1 if config is not None else m <= SPLIT_K_MAX_M
    if split_path:
        # fp32 partials of up to SPLIT_K splits, and a counter per output tile (BM and BN are at least 16).
        splits = config["SPLIT_K"] if config is not None else _SPLIT_K_MAX
        ws = torch.empty((splits, m, n), device=x2d.device, dtype=torch.float32)
        counters = _tile_counters(x2d.device, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    else:
        ws, counters = out, out         # not read: SPLIT_K = 1
    res = residual if residual is not None else out          # not read without HAS_RES
    args = (x2d, wq, scales, zeros, bias if bias is not None else scales, res, out, ws, counters,
            m, n, k, wq.shape[1], group_size, next_pow2(m),
            x2d.stride(0), x2d.stride(1), wq.stride(0), scales.stride(0), zeros.stride(0), res.stride(0),
            out.stride(0), m * n)
    consts = dict(BITS=bits, PER=per, ONE_GROUP=one_group, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                  PAIRED=paired,
                  ASM=not interpreting(),
                  DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32")
    small_bm = max(16, next_pow2(m))
    if config is not None:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        cfg.setdefault("BM", small_bm if "SPLIT_K" in cfg else 64)
        cfg.setdefault("SPLIT_K", 1)
        cfg.setdefault("GROUP_M", 8)
        cfg["BK"] = fit_bk(cfg["BK"], group_size, k)
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), cfg["SPLIT_K"])
        _wna16[grid](*args, **consts, **cfg, num_warps=warps, num_stages=stages)
    elif m <= SPLIT_K_MAX_M:
        def grid(meta):
            return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), meta["SPLIT_K"]
        _splitk_tuned[grid](*args, **consts, BM=small_bm)
    else:
        def grid(meta):
            return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), 1
        _tiled_tuned[grid](*args, **consts, SPLIT_K=1)
    return out if out.dtype == x2d.dtype else out.to(x2d.dtype)


__all__ = ["wna16_matmul", "supports"]
