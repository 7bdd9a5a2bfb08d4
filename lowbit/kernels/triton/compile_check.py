"""Compile every Triton kernel variant for real GPU architectures, without a GPU.

Triton lowers a kernel to PTX and a cubin (LLVM and ptxas ship in the triton wheel) for any target named
by ``GPUTarget``, no device needed. The interpreter tests check what the kernels compute; this checks that
the compiler accepts them for sm80 (A100), sm86 (A6000) and sm90 (H100/H200) with every autotuning config,
and reports the shared memory each config needs, so a config no supported GPU can launch is caught here
rather than on the first machine that has one.

    python -m lowbit.kernels.triton.compile_check [--arch 80,86,90] [--quick] [--sass] [--json FILE]

With ``--sass`` it also reads each GEMM's main loop from the machine code (``lowbit.kernels.triton.sass``):
instructions per weight, and for the decode kernel the bytes each SM keeps in flight at M = 1 on the issue's
W4A16 shapes (``W4A16_SHAPES``).

Must run with TRITON_INTERPRET unset: interpreted kernels are not compiled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels.triton import W4A16_SHAPES, act_quant, interpreting, w4a16, w8a8
from lowbit.kernels.triton.act_quant import NONE
from lowbit.kernels.triton.sass import SM, loop_profile, resident_programs

ARCHS = (80, 86, 90)


def compile_kernel(fn, arch: int, pointers: dict, floats: tuple, consts: dict, num_warps: int = 4,
                   num_stages: int = 3, aligned: tuple = (), ones: tuple = ()):
    """Compile ``fn`` for sm``arch``: ``pointers`` maps pointer args to Triton types ("*fp16"), ``floats`` names
    the fp32 scalars, every other runtime arg is i32; returns the compiled kernel (``.metadata.shared``).

    As Triton's launcher does at run time, ``aligned`` args (pointers 16-byte aligned, ints multiples of 16)
    get the divisibility hint and ``ones`` (ints equal to 1, such as unit strides) become constants: without
    them loads compile as scalar accesses, and the code is not what a real launch runs.
    """
    sig, consts = {}, {**consts, **{name: 1 for name in ones}}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _config_cases(configs, **fixed):
    for c in configs:
        yield {**fixed, **c.kwargs}, c.num_warps, c.num_stages


class Case:
    """One kernel variant to compile: the kernel, its argument types and constants, launch options, and the
    run-time specialization a typical launch gets (aligned pointers and sizes, unit strides)."""

    def __init__(self, label, fn, pointers, consts, warps, stages, floats=(), aligned=(), ones=(), per_weight=None,
                 arch_consts=None, programs=None):
        self.label, self.fn, self.pointers, self.consts = label, fn, pointers, consts
        self.arch_consts = arch_consts      # arch -> constants the launcher picks by architecture
        self.warps, self.stages, self.floats = warps, stages, floats
        self.aligned = tuple(pointers) + tuple(aligned)
        self.ones = ones
        self.per_weight = per_weight        # weights one loop iteration of one thread handles, for --sass
        self.programs = programs            # (N, K) -> programs a launch runs, for the in-flight bytes of --sass

    def in_flight(self, arch: int, prof: dict, shared: int) -> dict:
        """KiB of weights one SM keeps in flight at each (N, K) of W4A16_SHAPES. A program whose loop prefetches
        its weight tile with cp.async (LDGSTS bytes cover it) has num_stages - 1 tiles in flight, else one; an SM
        holds as many programs as fit (``resident_programs``) or as the grid gives it. Activation tiles are left
        out: at M = 1 they are one row, read from L2."""
        tile = self.consts["BN"] * self.consts["BK"] * self.consts["BITS"] // 8
        prefetched = prof["async_bytes"] * 32 * self.warps >= tile
        per_program = (self.stages - 1 if prefetched else 1) * tile
        fit = resident_programs(arch, prof["regs"], shared, self.warps)
        return {f"{n}x{k}": min(fit, self.programs(n, k) / SM.COUNT[arch]) * per_program / 1024
                for n, k in W4A16_SHAPES}

    def compile(self, arch: int):
        consts = {**self.consts, **(self.arch_consts(arch) if self.arch_consts else {})}
        return compile_kernel(self.fn, arch, self.pointers, self.floats, consts, self.warps, self.stages,
                              self.aligned, self.ones)


# Sizes and strides that are multiples of 16 in the shapes these kernels run (hidden sizes, packed row lengths).
_W_ALIGNED = ("N", "K", "KP", "GROUP", "stride_xm", "stride_wn", "stride_sn", "stride_zn", "stride_rm", "stride_ym")


def cases(quick: bool = False):
    """Every variant to check: each autotuning config of the hot paths (4-bit g128 fp16 weight-only, at M = 1
    and at a general M; per-channel W8A8), then one config of each other variant: 8-bit and byte-packed
    weights, per-channel, no bias, a K that is not a multiple of the tile, bf16/fp32 activations, W4A8, and the
    activation quantization kernels in fp16/bf16. (Over the ~80-line bar on purpose: it is the list of cases,
    one entry per variant.)"""
    # The hot path: 4-bit words read as int16 in the paired order, dequantized by inline PTX.
    w4p = {"x_ptr": "*fp16", "w_ptr": "*i16", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "r_ptr": "*fp16",
           "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    base = {"BITS": 4, "PER": 4, "ONE_GROUP": False, "HAS_BIAS": True, "HAS_RES": False, "EVEN_K": True,
            "PAIRED": True, "ASM": True,
            "DOT_DTYPE": tl.float16, "DOT_PRECISION": "tf32", "GROUP_M": 8}
    split = list(_config_cases(w4a16._SPLITK_CONFIGS, **base, BM=16))
    tiled = list(_config_cases(w4a16._TILED_CONFIGS, **base, SPLIT_K=1))
    if quick:
        split, tiled = split[:2], tiled[:2]

    def w4(label, consts, warps, stages, ptrs=None, ones=("stride_xk",), programs=None):
        per = consts["BN"] * consts["BK"] / (32 * warps)
        return Case(label, w4a16._wna16_kernel, {**w4p, **(ptrs or {})}, consts, warps, stages,
                    aligned=_W_ALIGNED + ("stride_wsk",), ones=ones, per_weight=per, programs=programs)

    for consts, warps, stages in split:
        def programs(n, k, c=consts):       # one row tile at M = 1
            return -(-n // c["BN"]) * c["SPLIT_K"]
        yield w4("w4a16 split-K, M=1", consts, warps, stages, ones=("stride_xk", "M", "M_BUCKET"), programs=programs)
    for consts, warps, stages in split[:1]:
        yield w4("w4a16 split-K", consts, warps, stages)
    for consts, warps, stages in tiled:
        yield w4("w4a16 tiled", consts, warps, stages)
    one = dict(split[0][0])
    unpaired = {"PAIRED": False, "PER": 8}
    variants = [("w4a16 8-bit", {"w_ptr": "*i32"}, {"BITS": 8, "PER": 4, "PAIRED": False}),
                ("w4a16 bytes", {"w_ptr": "*u8"}, {"PER": 2, "PAIRED": False}),
                ("w4a16 2-bit", {"w_ptr": "*i32"}, {"BITS": 2, "PER": 16, "PAIRED": False}),
                ("w4a16 per-channel, no bias", {}, {"ONE_GROUP": True, "HAS_BIAS": False}),
                ("w4a16 ragged K", {}, {"EVEN_K": False}),
                ("w4a16 residual", {}, {"HAS_RES": True}),
                ("w4a16 bf16", {"x_ptr": "*bf16", "b_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16"},
                 {"DOT_DTYPE": tl.bfloat16}),
                ("w4a16 bf16 8-bit", {"x_ptr": "*bf16", "b_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16",
                                      "w_ptr": "*i32"},
                 {"DOT_DTYPE": tl.bfloat16, "BITS": 8, "PER": 4, "PAIRED": False}),
                ("w4a16 fp32", {"x_ptr": "*fp32", "b_ptr": "*fp32", "r_ptr": "*fp32", "y_ptr": "*fp32",
                                "w_ptr": "*i32"},
                 {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee", **unpaired})]
    for label, ptrs, over in variants:
        yield w4(label, {**one, **over}, 4, 3, ptrs)

    w8p = {"x_ptr": "*i8", "sx_ptr": "*fp32", "xs_ptr": "*i32", "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8",
           "b_ptr": "*fp16", "r_ptr": "*fp16", "y_ptr": "*fp16"}

    def w8(label, consts, warps, stages, words=False):
        return Case(label, w8a8._w8a8_kernel, {**w8p, "w_ptr": "*i32"} if words else w8p, consts, warps, stages,
                    aligned=_W_ALIGNED, per_weight=consts["BN"] * consts["BK"] / (32 * warps),
                    arch_consts=lambda arch: {"SWAP": arch >= 90})        # as w8a8._swap picks it

    # 8-bit per-channel weights are read as bytes (CENTERED); the other formats as packed int32 words.
    w8s = list(_config_cases(w8a8._CONFIGS, BITS=8, PER=1, ONE_GROUP=True, HAS_BIAS=True, HAS_RES=False,
                             CENTERED=True, FLIP_ASM=True, EVEN_K=True, SIGNED=False))
    for consts, warps, stages in (w8s[:2] if quick else w8s):
        yield w8("w8a8", consts, warps, stages)
    yield w8("w8a8 ragged K", {**w8s[0][0], "EVEN_K": False}, w8s[0][1], w8s[0][2])
    yield w8("w8a8 residual", {**w8s[0][0], "HAS_RES": True}, w8s[0][1], w8s[0][2])
    for label, over in (("w8a8 grouped", {"ONE_GROUP": False, "BK": 64, "PER": 4}),
                        ("w4a8", {"BITS": 4, "PER": 8})):
        yield w8(label, {**w8s[0][0], **over, "CENTERED": False}, w8s[0][1], w8s[0][2], words=True)

    for x, tx in (("*fp16", tl.float16), ("*bf16", tl.bfloat16)):
        for label, pre in (("quantize_rows", act_quant.NONE), ("rmsnorm_quantize", act_quant.RMS),
                           ("layernorm_quantize", act_quant.LAYER), ("act_mul_quantize silu", act_quant.SILU_MUL),
                           ("act_mul_quantize gelu", act_quant.GELU_MUL),
                           ("act_mul_quantize gelu_tanh", act_quant.GELU_TANH_MUL)):
            yield Case(f"{label} {x[1:]}", act_quant._row_quant_kernel,
                       {"x_ptr": x, "w_ptr": x, "b_ptr": x, "q_ptr": "*i8", "s_ptr": "*fp32", "sum_ptr": "*i32"},
                       {"PRE": pre.value, "X_DTYPE": tx, "Y_DTYPE": tx, "WITH_SUM": pre.value == NONE.value,
                        "SINGLE": tx == tl.float16, "BLOCK": 4096}, 8, 3, floats=("KF", "eps"),
                       aligned=("K", "stride_xm", "stride_qm"))
    yield Case("quantize_rows fp16, a 16384-wide row in registers", act_quant._row_quant_kernel,
               {"x_ptr": "*fp16", "w_ptr": "*fp16", "b_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32",
                "sum_ptr": "*i32"},
               {"PRE": NONE.value, "X_DTYPE": tl.float16, "Y_DTYPE": tl.float16, "WITH_SUM": True, "SINGLE": True,
                "BLOCK": 16384}, 16, 3, floats=("KF", "eps"), aligned=("K", "stride_xm", "stride_qm"))
    for act, pre in (("silu", act_quant.SILU_MUL), ("gelu", act_quant.GELU_MUL), ("gelu_tanh", act_quant.GELU_TANH_MUL)):
        yield Case(f"act_mul {act} bf16", act_quant._act_mul_kernel, {"y_ptr": "*bf16", "o_ptr": "*bf16"},
                   {"ACT": pre.value, "X_DTYPE": tl.bfloat16, "BLOCK": 1024}, 4, 3, aligned=("F", "stride_ym", "stride_om"))


def check(archs=ARCHS, quick: bool = False, log=None, sass: bool = False) -> list[dict]:
    """Compile every case for every arch; rows of {label, arch, config, shared, fits, error} and, with ``sass``,
    the GEMMs' main-loop profile (``lowbit.kernels.triton.sass.loop_profile``) under "sass"."""
    if interpreting():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels are not compiled)")
    rows = []
    for case in cases(quick):
        cfg = {k: v for k, v in case.consts.items() if k in ("BM", "BN", "BK", "SPLIT_K", "BLOCK")}
        for arch in archs:
            row = {"label": case.label, "arch": arch,
                   "config": {**cfg, "num_warps": case.warps, "num_stages": case.stages}}
            try:
                out = case.compile(arch)
                row["shared"] = out.metadata.shared
                row["fits"] = out.metadata.shared <= SM.SHARED_PER_BLOCK[arch]
                if sass and case.per_weight:
                    prof = loop_profile(out.asm["cubin"], case.per_weight)
                    row["sass"] = {k: v for k, v in prof.items() if k != "by_opcode"}
                    if case.programs:
                        row["in_flight_kib"] = case.in_flight(arch, prof, out.metadata.shared)
            except Exception as e:          # a compiler error is the finding: report it, go on with the rest
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            rows.append(row)
            if log:
                log(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities (default 80,86,90)")
    ap.add_argument("--quick", action="store_true", help="two autotuning configs per hot path")
    ap.add_argument("--sass", action="store_true",
                    help="also disassemble the GEMMs and print their main loop's instructions per weight")
    ap.add_argument("--json", help="write the rows as JSON here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    def log(r):
        what = r.get("error") or f"{r['shared']} B shared{'' if r['fits'] else ' (OVER the limit)'}"
        if "sass" in r:
            p = r["sass"]
            what += (f", {p['regs']} regs, {p['spill_bytes']} B spilled; loop {p['per_weight']:.2f} instr/weight"
                     f" (int->float {p['cvt']:.2f}, smem stores {p['smem_stores']:.2f})")
        if "in_flight_kib" in r:
            what += "; KiB in flight per SM " + "/".join(f"{v:.0f}" for v in r["in_flight_kib"].values())
        print(f"sm{r['arch']} {r['label']} {r['config']}: {what}", flush=True)

    rows = check([int(x) for x in a.arch.split(",")], a.quick, log, a.sass)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    errors = [r for r in rows if "error" in r]
    flights = [r for r in rows if "in_flight_kib" in r]
    for arch in sorted({r["arch"] for r in flights}):
        best = {shape: max(r["in_flight_kib"][shape] for r in flights if r["arch"] == arch)
                for shape in flights[0]["in_flight_kib"]}
        print(f"sm{arch} W4A16 M=1, most KiB in flight per SM of any config (of {SM.COUNT[arch]} SMs): "
              + ", ".join(f"{shape} {v:.0f}" for shape, v in best.items()))
    print(f"Triton {triton.__version__}: {len(rows)} compilations in {time.perf_counter() - t0:.0f}s: "
          f"{len(errors)} failed, {sum(1 for r in rows if not r.get('fits', True))} over the shared-memory limit")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
