"""The TensorRT plugins' Triton kernels, in the argument order TensorRT launches an AOT plugin's kernel with:
the inputs' pointers, then int32 scalars, then the outputs' pointers (``tensorrt.plugin.aot_impl``).

Each is a thin wrapper over a kernel the torch runtime runs on CUDA: the INT8 GEMM of ``kernels/triton/w8a8.py``
(its ``SIGNED`` variant: int8 weights as stored for the plugin, no zero points) and the row quantization of
``kernels/triton/act_quant.py`` (plain, behind RMSNorm / LayerNorm, behind a gated activation). Float attributes
(eps) are compile-time constants: an AOT kernel takes only integer scalars.

``launch`` runs a plugin's kernel through Triton's own launcher (the plugins' JIT implementation, and the tests
under ``TRITON_INTERPRET=1``); ``compile_aot`` compiles it for one GPU architecture to PTX with its launch
geometry, which ``qdp`` hands to TensorRT. Neither needs TensorRT, and ``compile_aot`` needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import act_quant, next_pow2
from lowbit.kernels.triton.act_quant import GATED, MAX_BLOCK, NONE, _row_quant_kernel
from lowbit.kernels.triton.packed import TL_DTYPES, fit_bk
from lowbit.kernels.triton.w8a8 import MIN_BK, _w8a8_kernel

ARCHS = (80, 86, 89, 90)            # A100, A6000 / A10, L4 / L40, H100 / H200
# int8_linear tactics: (BM, BN, BK, num_warps, num_stages); one for decode-sized M, one for prefill. Both keep
# their shared memory within the 48 KiB a launch gets without opting in to more.
TACTICS = {1: (16, 64, 256, 4, 3), 2: (128, 64, 64, 4, 3)}


@triton.jit
def int8_linear_kernel(q_ptr, sx_ptr, w_ptr, s_ptr, b_ptr, M, N, K, GROUP, y_ptr, ONE_GROUP: tl.constexpr,
                       EVEN_K: tl.constexpr, SWAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr):
    _w8a8_kernel(q_ptr, sx_ptr, sx_ptr, w_ptr, s_ptr, s_ptr, b_ptr, y_ptr, y_ptr, M, N, K, K, GROUP, M,
                 K, K, tl.cdiv(K, GROUP), 0, 0, N, 8, 1, ONE_GROUP, True, False, False, False, EVEN_K, SWAP,
                 BM, BN, BK, GROUP_M, True)


@triton.jit
def quantize_x_kernel(x_ptr, K, q_ptr, s_ptr, PRE: tl.constexpr, X_DTYPE: tl.constexpr, SINGLE: tl.constexpr,
                      BLOCK: tl.constexpr):
    # A gated activation reads rows of 2K (gate, up) and writes K codes.
    _row_quant_kernel(x_ptr, x_ptr, x_ptr, q_ptr, s_ptr, s_ptr, K, K.to(tl.float32), 0.0,
                      K * 2 if PRE >= act_quant.SILU_MUL else K, K, PRE, X_DTYPE, X_DTYPE, False, SINGLE, BLOCK)


@triton.jit
def rmsnorm_quantize_kernel(x_ptr, w_ptr, K, q_ptr, s_ptr, EPS: tl.constexpr, X_DTYPE: tl.constexpr,
                            SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    _row_quant_kernel(x_ptr, w_ptr, x_ptr, q_ptr, s_ptr, s_ptr, K, K.to(tl.float32), EPS, K, K, act_quant.RMS,
                      X_DTYPE, X_DTYPE, False, SINGLE, BLOCK)


@triton.jit
def layernorm_quantize_kernel(x_ptr, w_ptr, b_ptr, K, q_ptr, s_ptr, EPS: tl.constexpr, X_DTYPE: tl.constexpr,
                              SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    _row_quant_kernel(x_ptr, w_ptr, b_ptr, q_ptr, s_ptr, s_ptr, K, K.to(tl.float32), EPS, K, K, act_quant.LAYER,
                      X_DTYPE, X_DTYPE, False, SINGLE, BLOCK)


@dataclass
class Launch:
    """One kernel launch of a plugin: the kernel, its constexprs, grid and launch options, and which runtime
    scalars it takes (in order, between the input and output pointers)."""
    fn: object
    consts: dict
    scalars: dict                  # name -> value (ints)
    grid: int
    num_warps: int
    num_stages: int = 3


def _row_launch(name: str, k: int, dtype: torch.dtype, attrs: dict) -> Launch:
    block = min(MAX_BLOCK, next_pow2(k))
    common = {"X_DTYPE": TL_DTYPES[dtype], "SINGLE": k <= block, "BLOCK": block}
    warps = 4 if block < 2048 else 8 if block <= 4096 else 16
    if name in ("quantize_int8", "act_mul_quant_int8"):
        pre = NONE if name == "quantize_int8" else GATED[attrs["act"]]
        return Launch(quantize_x_kernel, {"PRE": pre.value, **common}, {"K": k}, 0, warps)
    fn = rmsnorm_quantize_kernel if name == "rmsnorm_quant_int8" else layernorm_quantize_kernel
    return Launch(fn, {"EPS": float(attrs["eps"]), **common}, {"K": k}, 0, warps)


def plan(name: str, shapes: list, dtype: torch.dtype, attrs: dict, arch: int = 80, tactic: int = 1) -> Launch:
    """The launch of plugin ``name`` for input ``shapes`` (ints) in float ``dtype``; the grid counts programs for
    the rows given (M = the product of the leading dimensions)."""
    x = shapes[0]
    m = 1
    for d in x[:-1]:
        m *= d
    if name != "int8_linear":
        k = x[-1] // 2 if name == "act_mul_quant_int8" else x[-1]
        launch = _row_launch(name, k, dtype, attrs)
        launch.grid = m
        return launch
    n, k = shapes[2]
    group = min(int(attrs["group_size"]), k)
    bm, bn, bk, warps, stages = TACTICS[tactic]
    bk = fit_bk(bk, group, k, MIN_BK)
    consts = {"ONE_GROUP": group >= k, "EVEN_K": k % bk == 0, "SWAP": arch >= 90, "BM": bm, "BN": bn, "BK": bk,
              "GROUP_M": 8}
    return Launch(int8_linear_kernel, consts, {"M": m, "N": n, "K": k, "GROUP": group},
                  triton.cdiv(m, bm) * triton.cdiv(n, bn), warps, stages)


def launch(name: str, inputs: list[torch.Tensor], attrs: dict, tactic: int = 1,
           out: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Run plugin ``name``'s kernel on ``inputs`` (tensors on one device) -> its outputs, written into ``out``
    (contiguous, of the outputs' shapes and dtypes) when given."""
    from lowbit.kernels.tensorrt import output_shapes

    float_dtype = inputs[0].dtype if name != "int8_linear" else inputs[4].dtype
    arch = torch.cuda.get_device_capability(inputs[0].device)[0] * 10 if inputs[0].is_cuda else 80
    p = plan(name, [list(t.shape) for t in inputs], float_dtype, attrs, arch, tactic)
    shapes = output_shapes(name, [list(t.shape) for t in inputs])
    dtypes = [float_dtype] if name == "int8_linear" else [torch.int8, torch.float32]
    outputs = out if out is not None else [torch.empty(s, dtype=d, device=inputs[0].device)
                                           for s, d in zip(shapes, dtypes)]
    if p.grid:
        ins = [t.contiguous() for t in inputs]
        p.fn[(p.grid,)](*ins, *p.scalars.values(), *outputs, **p.consts, num_warps=p.num_warps,
                        num_stages=p.num_stages)
    return tuple(outputs)


_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_aot(name: str, shapes: list, dtype: torch.dtype, attrs: dict, arch: int, tactic: int = 1) -> dict:
    """Plugin ``name``'s kernel compiled for sm``arch`` (no GPU needed): {kernel_name, ptx, num_warps, shared,
    scalars (their order), consts}. ``shapes``: input shapes whose last dimensions (K, and the weight's N) are
    known; the row count may be anything (the grid is computed by TensorRT at run time)."""
    from lowbit.kernels.tensorrt import PLUGINS
    from lowbit.kernels.triton.compile_check import compile_kernel

    plugin = PLUGINS[name]
    p = plan(name, shapes, dtype, attrs, arch, tactic)
    kinds = {"float": _POINTER_TYPES[dtype], "float32": "*fp32", "int8": "*i8"}
    args = [a for a in p.fn.arg_names if a not in p.consts]
    pointers = args[:len(plugin.inputs)] + args[len(plugin.inputs) + len(p.scalars):]
    types = [kinds[k] for k in plugin.input_kinds] + [kinds[k] for k in plugin.output_kinds]
    kernel = compile_kernel(p.fn, arch, dict(zip(pointers, types)), (), p.consts, p.num_warps, p.num_stages)
    return {"kernel_name": kernel.metadata.name, "ptx": kernel.asm["ptx"], "num_warps": p.num_warps,
            "shared": kernel.metadata.shared, "scalars": list(p.scalars), "scalar_values": p.scalars,
            "consts": p.consts,
            "rows_per_program": p.consts.get("BM", 1), "cols_per_program": p.consts.get("BN")}

