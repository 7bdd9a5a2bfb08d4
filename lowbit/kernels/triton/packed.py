"""Reading lowbit's packed weight layout from Triton, shared by the W4A16 and W8A8 kernels.

The stored layout (``lowbit.format.quantize``): codes uint8 [N, ceil(K*bits/8)], a little-endian bitstream per
row, so code k of row n sits in byte ``k*bits // 8`` at bit ``k*bits % 8``. For bits dividing 8 no code
straddles a byte, and reading the row as little-endian int32 words keeps the same rule: code k is in word
``k // (32/bits)`` at bit ``(k % (32/bits)) * bits``. Kernels load a K tile of packed elements (words when
every row starts on a 4-byte boundary, else bytes), then expand each element into its codes with one
broadcast shift and mask; no repacking at load time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import interpreting

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_BITS = (2, 4, 8)      # bit widths that divide 8: no code crosses a byte (or word) boundary
MIN_BK = 16                     # smallest K tile tl.dot takes for 16-bit operands


def packed_view(qweight: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """(tensor the kernel loads, codes per loaded element): int32 words when every row is word-aligned."""
    qweight = qweight.contiguous()
    if qweight.shape[1] % 4 == 0 and qweight.data_ptr() % 4 == 0:
        return qweight.view(torch.int32), 32 // bits
    return qweight, 8 // bits


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes its output in: ``dtype``, except bf16 under the interpreter, whose float32 ->
    bf16 conversion truncates instead of rounding to nearest even; there the kernel writes float32 and torch
    rounds it (compiled kernels round correctly and write bf16 directly)."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def group_fits(bk: int, group: int, k: int) -> bool:
    """A K tile of ``bk`` columns never straddles two groups: bk divides the group, or one group spans K."""
    return group >= k or group % bk == 0


def fit_bk(bk: int, group: int, k: int, min_bk: int = MIN_BK) -> int:
    """The largest tile <= bk (halving, not below ``min_bk``) that fits the groups; ``min_bk`` if none."""
    while bk > min_bk and not group_fits(bk, group, k):
        bk //= 2
    return bk


def bk_pruner(min_bk: int = MIN_BK, max_acc_per_thread: int | None = None):
    """Autotune pruning: shrink each config's BK until a K tile stays within one group, then drop duplicates.

    ``max_acc_per_thread``: where the launcher fixes BM (the split-K path), also drop configs whose [BM, BN]
    accumulator tile puts more than this many elements on a thread (they spill registers), keeping at least
    the config with the fewest.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        group, k = args["GROUP"], args["K"]
        out, seen = [], set()
        for c in configs:
            kw = dict(c.kwargs)
            kw["BK"] = fit_bk(kw["BK"], group, k, min_bk)
            sig = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if sig not in seen:
                seen.add(sig)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=c.pre_hook))
        if max_acc_per_thread is not None and "BM" in args:
            def per_thread(c):
                return args["BM"] * c.kwargs["BN"] / (32 * c.num_warps)
            fits = [c for c in out if per_thread(c) <= max_acc_per_thread]
            out = fits or [min(out, key=per_thread)]
        return out

    return prune


def with_even_k(kernel):
    """``kernel`` with its EVEN_K constant (BK divides K) set at launch from the config's BK, which the
    autotuner picks: wrap it in this, then in ``triton.autotune``."""
    return triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(kernel)


@triton.jit
def output_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows rm, columns rn, their in-bounds masks) of program ``pid``'s [BM, BN] output tile, with GROUP_M row
    tiles visited together so their weight tiles are reused from L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    return rm, rn, rm < M, rn < N


@triton.jit
def load_codes(w_ptr, rn, n_mask, k0, KP, stride_wn, BITS: tl.constexpr, PER: tl.constexpr, BK: tl.constexpr,
               BN: tl.constexpr, EVEN_K: tl.constexpr):
    """Unsigned codes int32 [BN, BK]: columns k0..k0+BK of weight rows rn (k0 a multiple of PER), K fastest.

    Loads BK/PER packed elements per row (contiguous along K, so a row's bytes arrive in one transaction) and
    splits each into its PER codes, lowest bits first, which is the order the bitstream stores them in. The
    tile keeps the stored orientation (K contiguous): the GEMMs use it as their dot's K-major operand, so no
    transpose through shared memory is needed.
    """
    re = k0 // PER + tl.arange(0, BK // PER)
    ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + re[None, :]
    # EVEN_K (BK divides K): no mask along K, so the loads vectorize (a bound that is not a compile-time
    # constant makes every element's predicate different).
    if EVEN_K:
        v = tl.load(ptrs, mask=n_mask[:, None], other=0)
    else:
        v = tl.load(ptrs, mask=n_mask[:, None] & (re[None, :] < KP), other=0)
    v = v.to(tl.uint32)                                                                     # [BN, BK/PER]
    # Halve each element's bit field log2(PER) times: (low half, high half) joined along a new last axis each
    # time. tl.join keeps the new axis in the same thread's registers, so the codes of one element stay where
    # its load put them (a shift-by-arange broadcast instead lets layout propagation reload every code).
    for i in tl.static_range(5):                        # PER <= 32 codes per element: at most 5 halvings
        if (PER >> i) > 1:
            v = tl.join(v & ((1 << ((BITS * PER) >> (i + 1))) - 1), v >> ((BITS * PER) >> (i + 1)))
    return tl.reshape(v & ((1 << BITS) - 1), (BN, BK)).to(tl.int32)

