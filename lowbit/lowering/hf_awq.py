"""Lowering to the AWQ checkpoint in AutoAWQ's GEMM layout (target ``hf-awq``), servable by vLLM, transformers
and GPTQModel. It stores the real zero point, so it holds asymmetric 4-bit weights as the passes made them
(symmetric ones too: their zero point is 8).

The artifact is an ordinary transformers model folder (``lowering/hf_checkpoint.py``). Layout per quantized
linear ``L``, 4-bit codes, eight per int32 along N in the interleaved order ``AWQ_ORDER`` (nibble i of a word
holds column ``AWQ_ORDER[i]`` of its eight):

- ``L.qweight`` int32 [K, N / 8]: ``qweight[k, j] = sum_i code[8*j + AWQ_ORDER[i], k] << (4*i)``
- ``L.qzeros``  int32 [G, N / 8]: the zero points ``zero[n, g]``, packed the same way
- ``L.scales``  float16 [G, N];  ``L.bias`` float16 [N]

with G = K / group_size (groups must divide K) and ``W[n, k] = (code - zero) * scale``.
"""

from __future__ import annotations

import torch

from lowbit.lowering.hf_checkpoint import CheckpointLowering, as_int32, codes_of

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes [R, C] (C a multiple of 8) -> int32 [R, C / 8] in AWQ's interleaved nibble order."""
    r, c = codes.shape
    grouped = codes.to(torch.int64).view(r, c // 8, 8)[:, :, list(AWQ_ORDER)]
    words = (grouped << (torch.arange(8, dtype=torch.int64) * 4)).sum(dim=2)
    return as_int32(words)


class HfAwqLowering(CheckpointLowering):
    """The ``hf-awq`` target (``lowbit.targets``)."""
    name, title = "hf-awq", "the AWQ checkpoint"

    def spec_refusal(self, spec):
        if spec.act_bits:
            return f"AWQ is weight-only, and the recipe has INT{spec.act_bits} activations"
        if spec.bits != 4:
            return f"AWQ checkpoints hold 4-bit weights, not {spec.bits}-bit"
        if spec.group_size <= 0:
            return "AWQ stores groups along K, not one scale per output channel; use a recipe with group_size 32-128"
        return None

    def refusal(self, recipe):
        if recipe.quantizes and recipe.scheme.quantize_lm_head:
            return "AWQ checkpoints keep lm_head float; set quantize_lm_head = false"
        return super().refusal(recipe)

    def shape_refusal(self, name, k, n, spec):
        if k % spec.group(k):
            return f"AWQ needs groups that divide K, and K={k} is not a multiple of group_size {spec.group_size}"
        if n % 8:
            return f"AWQ packs 8 codes per int32 along N, and N={n} is not a multiple of 8"
        return None

    def layer_tensors(self, q):
        out = {"qweight": pack_awq(codes_of(q).t().contiguous()),             # [K, N/8]
               "qzeros": pack_awq(q.zeros.t().contiguous()),                  # [G, N/8]
               "scales": q.scales.t().to(torch.float16)}                      # [G, N]
        if q.bias is not None:
            out["bias"] = q.bias.to(torch.float16)
        return out

    def quantization_config(self, graph, recipe):
        first = next(iter(graph.quantized.values()))
        return {"quant_method": "awq", "bits": 4, "group_size": first.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None,
                "lowbit": {"method": recipe.method, "sym": first.spec.sym, "mse": recipe.scheme.mse}}


LOWERING = HfAwqLowering()
