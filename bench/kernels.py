"""Kernel benchmark (one CUDA GPU): lowbit's Triton W4A16 / W8A8 GEMMs against cuBLAS FP16 and torch's own kernels.

    python -m bench.kernels                          # full sweep (a few minutes: autotuning dominates)
    python -m bench.kernels --quick                  # W4A16 on 2 shapes x M in 1, 16, 64; W8A8 on 1 shape
    python -m bench.kernels --json out/kernels.json --markdown
    python -m bench.kernels --dry-run                # no GPU: every code path on tiny shapes in Triton's
                                                     # interpreter, timed by the wall clock (numbers mean nothing)

W4A16 (g128, asymmetric): FP16 ``F.linear`` (cuBLAS), torch's built-in int4 kernel
(``aten._weight_int4pack_mm``, bf16 activations, its own packed layout) and ``lowbit::wna16_linear``'s Triton
kernel, with the bandwidth ours achieves (packed weight + scales + zeros + activations per call) as a fraction
of a device-to-device copy measured in the same run.

W8A8 (per-channel, symmetric): FP16 ``F.linear``, ``torch._int_mm`` (best of two weight layouts; alone, and
with the per-token activation quantization and the float rescale done in torch, so it computes what ours
does) and ours (activation quantization + fused INT8 GEMM; also the GEMM alone). Throughput in TOP/s as a
fraction of a large FP16 matmul's TFLOP/s measured in the same run (INT8 tensor-core peak is 2x FP16's).

Timing: ``triton.testing.do_bench`` medians (it flushes L2 before every call); each method also cycles over
enough copies of its weights and inputs to exceed 2x the L2 size, so nothing is served from cache. Every
shape is checked against ``F.linear`` on the dequantized weight before it is timed.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.kernels")

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.cli import run_script
from lowbit.errors import LowbitError
from lowbit.kernels.triton import W4A16_SHAPES as W4_SHAPES         # (N, K)

W4_MS = [1, 2, 4, 8, 16, 32, 64, 128]
W8_SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192)]
W8_MS = [512, 2048, 8192]
GROUP = 128
DRY_SHAPES, DRY_MS = [(96, 256)], [1, 16, 80]        # --dry-run: both W4A16 paths, one tile or two

DEV = "cuda"            # "cpu" under --dry-run


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench (CUDA events, L2 flushed before each call) on a GPU;
    the wall clock over three calls in a dry run."""
    if DEV != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def timed(make, set_bytes: int, l2_bytes: int) -> float:
    """Median milliseconds of one call, cycling over copies from ``make()`` (each a zero-arg callable on its own
    buffers of ``set_bytes``) so that together they exceed 2x L2."""
    copies = min(64, max(2, math.ceil(2 * l2_bytes / max(set_bytes, 1)) + 1))
    calls = itertools.cycle([make() for _ in range(copies)])
    # One call first: autotuning and compilation happen there. Inside do_bench they would inflate its estimate
    # of a call's time, and with it cut the number of timed repetitions to one.
    next(calls)()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return bench_ms(lambda: next(calls)())


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes/s (read + write): the practical ceiling for a weight stream."""
    n = 1 << (30 if DEV == "cuda" else 20)
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
    return 2 * n / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def fp16_tflops() -> float:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.float16)
    b = torch.randn(n, n, device=DEV, dtype=torch.float16)
    return 2 * n**3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


# ---- W4A16 ---------------------------------------------------------------------------------------------------

def random_w4(n: int, k: int, gen: torch.Generator):
    """A random asymmetric 4-bit g128 weight in lowbit's stored layout, on the GPU."""
    g = k // GROUP
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, g, generator=gen) * 0.01 + 0.002).half()
    zeros = torch.randint(0, 16, (n, g), dtype=torch.uint8, generator=gen)
    return qweight.to(DEV), scales.to(DEV), zeros.to(DEV)


def torch_int4_weight(qweight, scales, zeros):
    """The same weight in torch's int4 layout: codes [N, K/2] with even k in the high nibble, converted by
    ``_convert_weight_to_int4pack``; scales_and_zeros [G, N, 2] with w = (q - 8) * s + zero, so zero = (8 - z) * s."""
    from lowbit.format.quantize import unpack_codes

    codes = unpack_codes(qweight, 4, qweight.shape[1] * 2)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    wp = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return wp, sz


def bench_w4a16(shapes, ms, l2: int, copy_bw: float, gen, rows: list, save=None) -> list[dict]:
    from lowbit.ops import dequantized_weight
    from lowbit.kernels.triton.w4a16 import wna16_matmul

    for n, k in shapes:
        qweight, scales, zeros = random_w4(n, k, gen)
        w16 = dequantized_weight(qweight, scales, zeros, 4, GROUP, k, torch.float16)
        for m in sorted({ms[0], ms[-1]}):     # the smallest and largest M (split-K; tiled above 64) before timing
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            err = rel_err(wna16_matmul(x, qweight, scales, zeros, None, 4, GROUP, k), F.linear(x, w16))
            if err > 1e-2:
                raise LowbitError(f"W4A16 {n}x{k} M={m}: relative error {err:.2e} against F.linear; not timing")
        try:
            t4 = torch_int4_weight(qweight, scales, zeros)
            xb = torch.randn(ms[-1], k, device=DEV, dtype=torch.bfloat16)
            t4_err = rel_err(torch.ops.aten._weight_int4pack_mm(xb, t4[0], GROUP, t4[1]), F.linear(xb, w16.bfloat16()))
        except Exception as e:      # this torch build or GPU lacks the kernel
            t4, t4_err = None, None
            print(f"  torch int4 kernel n/a for {n}x{k}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        wbytes = qweight.numel() + scales.numel() * 2 + zeros.numel()
        for m in ms:
            def ours():
                q, s, z = qweight.clone(), scales.clone(), zeros.clone()
                x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                return lambda: wna16_matmul(x, q, s, z, None, 4, GROUP, k)

            def fp16():
                w, x = w16.clone(), torch.randn(m, k, device=DEV, dtype=torch.float16)
                return lambda: F.linear(x, w)

            def int4():
                wp, sz = t4[0].clone(), t4[1].clone()
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                return lambda: torch.ops.aten._weight_int4pack_mm(x, wp, GROUP, sz)

            moved = wbytes + m * k * 2
            t_ours = timed(ours, moved, l2)
            t_fp16 = timed(fp16, n * k * 2 + m * k * 2, l2)
            t_int4 = timed(int4, moved, l2) if t4 is not None else None
            rows.append({"N": n, "K": k, "M": m, "fp16_ms": t_fp16, "torch_int4_ms": t_int4, "ours_ms": t_ours,
                         "speedup_vs_fp16": t_fp16 / t_ours,
                         "speedup_vs_torch_int4": t_int4 / t_ours if t_int4 else None,
                         "ours_GBps": moved / (t_ours * 1e-3) / 1e9,
                         "ours_frac_copy_bw": moved / (t_ours * 1e-3) / copy_bw, "torch_int4_rel_err": t4_err})
            print(f"  w4a16 {n}x{k} M={m}: fp16 {t_fp16 * 1e3:.1f} us, ours {t_ours * 1e3:.1f} us", flush=True)
        if save:
            save()
    return rows


# ---- W8A8 ----------------------------------------------------------------------------------------------------

def random_w8(n: int, k: int, gen: torch.Generator):
    """A random symmetric per-channel 8-bit weight (codes 1..255, zero 128) in the stored layout, on the GPU."""
    qweight = torch.randint(1, 256, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, 1, generator=gen) * 0.01 + 0.002).half()
    zeros = torch.full((n, 1), 128, dtype=torch.uint8)
    return qweight.to(DEV), scales.to(DEV), zeros.to(DEV)


def bench_w8a8(shapes, ms, l2: int, peak_fp16: float, gen, rows: list, save=None) -> list[dict]:
    from lowbit.ops import dequantized_weight, quantize_rows_int8
    from lowbit.kernels.triton.act_quant import quantize_rows
    from lowbit.kernels.triton.w8a8 import w8a8_linear, w8a8_matmul

    for n, k in shapes:
        qweight, scales, zeros = random_w8(n, k, gen)
        w16 = dequantized_weight(qweight, scales, zeros, 8, k, k, torch.float16)
        w_nk = (qweight.to(torch.int16) - 128).to(torch.int8)           # the signed weight [N, K]
        sw = scales.float().reshape(1, n)
        x = torch.randn(ms[0], k, device=DEV, dtype=torch.float16)
        xq, sx = quantize_rows_int8(x)
        # Against F.linear on the dequantized weight and the dequantized INT8 activations (fp32 math): the same
        # product up to float rounding, so a kernel bug shows as a large error.
        err = rel_err(w8a8_linear(x, qweight, scales, zeros, None, 8, k, k), F.linear(xq.float() * sx, w16.float()))
        if err > 5e-3:
            raise LowbitError(f"W8A8 {n}x{k}: relative error {err:.2e} against F.linear; not timing")
        for m in ms:
            def fp16():
                w, xx = w16.clone(), torch.randn(m, k, device=DEV, dtype=torch.float16)
                return lambda: F.linear(xx, w)

            def weight_kn(layout):
                """A copy of the signed weight as _int_mm's [K, N]: row-major, or the transpose of [N, K]."""
                return w_nk.t().contiguous() if layout == "kn" else w_nk.clone().t()

            def int_mm(layout):
                def make():
                    b = weight_kn(layout)
                    a = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
                    return lambda: torch._int_mm(a, b)
                return make

            def int_mm_full(layout):
                def make():
                    b = weight_kn(layout)
                    xx = torch.randn(m, k, device=DEV, dtype=torch.float16)

                    def run():
                        xq, sx = quantize_rows_int8(xx)
                        return (torch._int_mm(xq, b).float() * sw * sx).half()
                    return run
                return make

            def ours_full():
                q, s, z = qweight.clone(), scales.clone(), zeros.clone()
                xx = torch.randn(m, k, device=DEV, dtype=torch.float16)
                return lambda: w8a8_linear(xx, q, s, z, None, 8, k, k)

            def ours_gemm():
                q, s, z = qweight.clone(), scales.clone(), zeros.clone()
                xq, sx, sums = quantize_rows(torch.randn(m, k, device=DEV, dtype=torch.float16), with_sums=True)
                return lambda: w8a8_matmul(xq, sx, q, s, z, None, 8, k, k, torch.float16, x_sums=sums)

            set8 = n * k + m * k
            t_fp16 = timed(fp16, 2 * (n * k + m * k), l2)
            mm = {}
            for lay in ("kn", "nk_t"):      # [K, N] row-major, or the transpose of the contiguous [N, K]
                try:
                    mm[lay] = timed(int_mm(lay), set8, l2)
                except RuntimeError as e:
                    print(f"  _int_mm with weight layout {lay} failed: {str(e).splitlines()[0][:100]}")
            if not mm:
                raise LowbitError("torch._int_mm failed with both weight layouts")
            best = min(mm, key=mm.get)
            t_mm_full = timed(int_mm_full(best), set8 + 2 * m * k, l2)
            t_ours = timed(ours_full, set8 + 2 * m * k, l2)
            t_ours_gemm = timed(ours_gemm, set8, l2)
            tops = 2 * m * n * k / (t_ours * 1e-3) / 1e12
            rows.append({"N": n, "K": k, "M": m, "fp16_ms": t_fp16, "int_mm_ms": mm[best], "int_mm_layout": best,
                         "int_mm_with_quant_ms": t_mm_full, "ours_ms": t_ours, "ours_gemm_ms": t_ours_gemm,
                         "speedup_vs_fp16": t_fp16 / t_ours, "speedup_vs_int_mm_with_quant": t_mm_full / t_ours,
                         "ours_TOPs": tops, "ours_frac_fp16_peak": tops / peak_fp16})
            print(f"  w8a8 {n}x{k} M={m}: fp16 {t_fp16 * 1e3:.0f} us, ours {t_ours * 1e3:.0f} us", flush=True)
        if save:
            save()
    return rows


def autotuned_configs() -> dict:
    """The config each autotuned kernel picked, per tuning key: what to start from when tuning further."""
    from lowbit.kernels.triton import w4a16, w8a8

    out = {}
    for name, tuner in (("w4a16 split-K", w4a16._splitk_tuned), ("w4a16 tiled", w4a16._tiled_tuned),
                        ("w8a8", w8a8._tuned)):
        out[name] = {str(key): str(cfg) for key, cfg in getattr(tuner, "cache", {}).items()}
    return out


# ---- output --------------------------------------------------------------------------------------------------

def _us(ms):
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def w4_table(rows, md: bool) -> str:
    head = ["N", "K", "M", "fp16 us", "torch int4 us", "ours us", "vs fp16", "vs int4", "ours GB/s", "of copy BW"]
    body = [[r["N"], r["K"], r["M"], _us(r["fp16_ms"]), _us(r["torch_int4_ms"]), _us(r["ours_ms"]),
             _x(r["speedup_vs_fp16"]), _x(r["speedup_vs_torch_int4"]), f"{r['ours_GBps']:.0f}",
             f"{r['ours_frac_copy_bw']:.0%}"] for r in rows]
    return _table(head, body, md)


def w8_table(rows, md: bool) -> str:
    head = ["N", "K", "M", "fp16 us", "_int_mm us", "_int_mm+quant us", "ours us", "ours GEMM us", "vs fp16",
            "vs _int_mm+quant", "ours TOP/s", "of fp16 peak"]
    body = [[r["N"], r["K"], r["M"], _us(r["fp16_ms"]), f"{_us(r['int_mm_ms'])} ({r['int_mm_layout']})",
             _us(r["int_mm_with_quant_ms"]), _us(r["ours_ms"]), _us(r["ours_gemm_ms"]), _x(r["speedup_vs_fp16"]),
             _x(r["speedup_vs_int_mm_with_quant"]), f"{r['ours_TOPs']:.0f}", f"{r['ours_frac_fp16_peak']:.0%}"]
            for r in rows]
    return _table(head, body, md)


def _table(head, body, md: bool) -> str:
    cells = [[str(c) for c in row] for row in [head] + body]
    if md:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(head)] + lines[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 W4A16 shapes x M in 1, 16, 64; 1 W8A8 shape")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: run every code path on tiny CPU shapes in Triton's interpreter (checks the "
                         "script, not speed)")
    a = ap.parse_args()
    global DEV
    if a.dry_run:
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"        # read by triton when a kernel is launched
    elif not torch.cuda.is_available():
        raise LowbitError("bench/kernels.py needs a CUDA GPU, and torch sees none (--dry-run checks it on CPU)")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise LowbitError(f"bench/kernels.py needs triton ({e}); install lowbit's dev extra") from e
    w4_shapes, w4_ms = (W4_SHAPES[:2], [1, 16, 64]) if a.quick else (W4_SHAPES, W4_MS)
    w8_shapes, w8_ms = (W8_SHAPES[:1], [512, 2048]) if a.quick else (W8_SHAPES, W8_MS)
    if a.dry_run:
        w4_shapes, w4_ms, w8_shapes, w8_ms = DRY_SHAPES, DRY_MS, DRY_SHAPES, DRY_MS[1:]

    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    l2 = (getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)) if props else 1 << 16
    gen = torch.Generator().manual_seed(0)
    copy_bw, peak = copy_bandwidth(), fp16_tflops()
    name = props.name if props else "CPU (dry run: Triton interpreter, wall-clock timings)"
    info = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "L2_MiB": l2 / 2**20,
            "copy_GBps": copy_bw / 1e9, "fp16_matmul_TFLOPs": peak}
    print(f"{name}: L2 {l2 / 2**20:.0f} MiB, D2D copy {copy_bw / 1e9:.0f} GB/s, "
          f"FP16 matmul {peak:.0f} TFLOP/s, torch {torch.__version__}, triton {triton.__version__}")
    w4, w8 = [], []

    def save():
        """Write what is measured so far (a run cut short by a time limit keeps its rows)."""
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"info": info, "w4a16": w4, "w8a8": w8,
                                                "autotuned": autotuned_configs()}, indent=1))

    # The M the targets name first (W4A16 at 1, 16 and 64, then W8A8), the other M last: a run cut
    # short by a time limit has measured what matters most.
    first = [m for m in w4_ms if m in (1, 16, 64)] or w4_ms
    bench_w4a16(w4_shapes, first, l2, copy_bw, gen, w4, save)
    bench_w8a8(w8_shapes, w8_ms, l2, peak, gen, w8, save)
    rest = [m for m in w4_ms if m not in first]
    if rest:
        bench_w4a16(w4_shapes, rest, l2, copy_bw, gen, w4, save)
    w4.sort(key=lambda r: (r["N"], r["K"], r["M"]))
    print(f"\nW4A16 g{GROUP} (fp16 activations; torch int4 uses bf16), median us per call\n" + w4_table(w4, a.markdown))
    print("\nW8A8 per-channel (fp16 in/out; ours and _int_mm+quant include activation quantization), median us"
          " per call; INT8 tensor-core peak is 2x the FP16 one\n" + w8_table(w8, a.markdown))
    save()
    return 0


if __name__ == "__main__":
    run_script(main, "kernels")
