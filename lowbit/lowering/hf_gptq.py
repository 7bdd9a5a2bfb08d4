"""Lowering to the standard GPTQ checkpoint (target ``hf-gptq``), servable by vLLM, transformers, GPTQModel.

The artifact is an ordinary transformers model folder (``lowering/hf_checkpoint.py``). Layout per quantized
linear ``L`` (GPTQ "v1", ``checkpoint_format: gptq``), bits b in {4, 8}, f = 32 / b codes per int32:

- ``L.qweight`` int32 [K / f, N]: ``qweight[i, n] = sum_j code[n, f*i + j] << (b*j)`` (packed along K)
- ``L.qzeros``  int32 [G, N / f]: ``qzeros[g, i] = sum_j (zero[f*i + j, g] - 1) << (b*j)`` (along N, minus one)
- ``L.scales``  float16 [G, N];  ``L.g_idx`` int32 [K] = k // group_size;  ``L.bias`` float16 [N]

G = ceil(K / group_size). Symmetric weights only: their zero point 2^(b-1) is what GPTQ readers assume, and vLLM
takes no other (``sym=False`` is rejected). Asymmetric zero points of 0, which "zero - 1" cannot store, are
common, so asymmetric recipes go to hf-awq or compressed-tensors, which store the real zero point. lowbit's
act-order uses static groups, so groups are contiguous and g_idx is the identity grouping: ``desc_act`` is
written as false (readers then need no reordering); the ``lowbit`` entry of the config records that act-order
was used.
"""

from __future__ import annotations

import torch

from lowbit.lowering.hf_checkpoint import CheckpointLowering, as_int32, codes_of

SUPPORTED_BITS = (4, 8)


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, C] -> int32 [R * bits / 32, C], f = 32/bits consecutive rows per word, low bits first."""
    f = 32 // bits
    r, c = codes.shape
    grouped = codes.to(torch.int64).view(r // f, f, c)
    shifts = (torch.arange(f, dtype=torch.int64) * bits).view(1, f, 1)
    words = (grouped << shifts).sum(dim=1)
    return as_int32(words)


class HfGptqLowering(CheckpointLowering):
    """The ``hf-gptq`` target (``lowbit.targets``)."""
    name, title = "hf-gptq", "the GPTQ checkpoint"

    def spec_refusal(self, spec):
        if spec.act_bits:
            return f"GPTQ is weight-only, and the recipe has INT{spec.act_bits} activations"
        if spec.bits not in SUPPORTED_BITS:
            return f"GPTQ checkpoints hold 4 and 8-bit weights, not {spec.bits}-bit"
        if not spec.sym:
            return ("vLLM loads only symmetric GPTQ (sym = true), and GPTQ's 'zero - 1' cannot store a zero point "
                    "of 0")
        return None

    def shape_refusal(self, name, k, n, spec):
        f = 32 // spec.bits
        if k % f or n % f:
            return f"GPTQ packs {f} codes per int32, and K={k}, N={n} must both be multiples of {f}"
        return None

    def layer_tensors(self, q):
        out = {"qweight": pack_along_rows(codes_of(q).t().contiguous(), q.spec.bits),
               "qzeros": pack_along_rows((q.zeros.to(torch.int64) - 1).to(torch.uint8), q.spec.bits).t(),
               "scales": q.scales.t().to(torch.float16),
               "g_idx": (torch.arange(q.in_features, dtype=torch.int32) // q.group_size).to(torch.int32)}
        if q.bias is not None:
            out["bias"] = q.bias.to(torch.float16)
        return out

    def quantization_config(self, graph, recipe):
        first = next(iter(graph.quantized.values()))
        return {"quant_method": "gptq", "bits": first.spec.bits,
                "group_size": first.spec.group_size if first.spec.group_size > 0 else -1,
                "desc_act": False, "sym": True, "true_sequential": True, "damp_percent": recipe.gptq.damp,
                "static_groups": recipe.gptq.static_groups, "checkpoint_format": "gptq",
                "lm_head": "lm_head" in graph.quantized,
                "lowbit": {"method": recipe.method, "act_order": recipe.gptq.act_order, "mse": recipe.scheme.mse}}


LOWERING = HfGptqLowering()
