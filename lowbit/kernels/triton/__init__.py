"""Triton GPU kernels for lowbit's quantized ops (the CUDA implementations of ``torch.ops.lowbit.*``).

Modules
-------
``w4a16``
    Weight-only GEMM ``y = x @ dequant(W).T + bias`` reading the packed layout of ``lowbit.format.quantize``
    as stored (2/4/8-bit codes, fp16 scales, uint8 zero points, groups along K): a split-K kernel for
    decode-sized M and a tiled tensor-core kernel for prefill-sized M.
``act_quant``
    Per-token symmetric INT8 quantization of activations, bit-identical to ``ops.quantize_rows_int8``, and the
    same fused behind an RMSNorm or LayerNorm (one read of the hidden state instead of three) or behind a gated
    activation ``act(gate) * up``; and that gated activation alone.
``w8a8``
    INT8 x INT8 -> INT32 GEMM with the per-group weight scales, the per-token activation scale and the bias
    applied in the epilogue (W8A8, and W4A8 with nibbles widened to int8 in registers).

Triton is optional (only the ``dev`` extra installs it): nothing here is imported by ``import lowbit``. The
ops in ``lowbit.ops`` import these modules lazily inside their CUDA kernels and fall back to the
reference math when Triton is missing or a shape is not supported. With ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors through Triton's interpreter (numpy), which is how the tests run without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

# The (N, K) weight shapes the W4A16 kernels are held to (bench/kernels.py times them; compile_check --sass
# models them): Llama-7B and -70B class projections.
W4A16_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (no compilation, no autotuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (checked once: an import that failed will fail again)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:       # a broken install (missing libcuda bits, ABI mismatch) counts as absent
        return False
    return True


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1): the autotuning bucket for a run-time size such as M."""
    return 1 << max(0, int(n) - 1).bit_length()


def load(name: str):
    """The kernel module ``lowbit.kernels.triton.<name>`` when Triton is usable, else None."""
    if not triton_available():
        return None
    return importlib.import_module(f"{__name__}.{name}")
