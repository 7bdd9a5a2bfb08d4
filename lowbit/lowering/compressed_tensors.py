"""Lowering to a compressed-tensors checkpoint (target ``compressed-tensors``), the format llm-compressor writes
and vLLM and transformers (with the ``compressed-tensors`` package) load.

The artifact is an ordinary transformers model folder (``lowering/hf_checkpoint.py``). compressed-tensors states
each layer's format in ``config_groups``, so one checkpoint holds mixed formats, and the layers a recipe keeps
float are listed in ``ignore``. Codes are signed in this format: ``code - 2^(b-1)``, stored with that offset
added back, so the stored bits are lowbit's unsigned codes. Per quantized linear ``L``, b bits, G groups:

- weight-only (``pack-quantized``, b = 2..8, symmetric or not, groups or per channel):
  ``L.weight_packed`` int32 [N, ceil(K*b/32)], each row's codes as one little-endian bitstream of 32-bit words;
  ``L.weight_scale`` float16 [N, G]; ``L.weight_shape`` int64 [2] = (N, K); asymmetric also
  ``L.weight_zero_point`` int32 [ceil(N*b/32), G], the zero points packed the same way along N.
- INT8 weights with per-token dynamic INT8 activations (``int-quantized``, ZeroQuant's W8A8):
  ``L.weight`` int8 [N, K] = code - 128 and ``L.weight_scale`` float16 [N, G]; symmetric, so no zero point.
  Other bit widths with INT8 activations (W4A8) are ``pack-quantized`` with the same activation entry.

``W[n, k] = (code - zero) * scale`` with the zero point 2^(b-1) when symmetric. Groups must divide K.
"""

from __future__ import annotations

import torch

from lowbit.format.quantize import pack_codes
from lowbit.lowering.hf_checkpoint import CheckpointLowering, as_int32, codes_of


def words_of(packed: torch.Tensor) -> torch.Tensor:
    """uint8 little-endian bitstreams [R, B] -> int32 words [R, ceil(B/4)] (zero bits pad the last word)."""
    r, b = packed.shape
    padded = torch.cat([packed, packed.new_zeros(r, (-b) % 4)], dim=1).to(torch.int64).view(r, -1, 4)
    words = (padded << (torch.arange(4, dtype=torch.int64) * 8)).sum(dim=2)
    return as_int32(words)


def layer_format(spec) -> str:
    return "int-quantized" if spec.act_bits and spec.bits == 8 else "pack-quantized"


def quantization_args(spec) -> dict:
    """The ``weights`` entry of a config group for ``spec``."""
    grouped = spec.group_size > 0
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
            "strategy": "group" if grouped else "channel", "group_size": spec.group_size if grouped else None,
            "dynamic": False, "actorder": None}


# ZeroQuant's activations: symmetric INT8, one scale per token, computed at run time.
TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


class CompressedTensorsLowering(CheckpointLowering):
    """The ``compressed-tensors`` target (``lowbit.targets``)."""
    name, title = "compressed-tensors", "the compressed-tensors checkpoint"
    uniform = False

    def spec_refusal(self, spec):
        return None               # every bit width, grouping and symmetry lowbit makes, and INT8 activations

    def shape_refusal(self, name, k, n, spec):
        if spec.group_size > 0 and k % spec.group_size:
            return (f"compressed-tensors needs groups that divide K, and K={k} is not a multiple of group_size "
                    f"{spec.group_size}")
        return None

    def layer_tensors(self, q):
        spec = q.spec
        if layer_format(spec) == "int-quantized":
            out = {"weight": (codes_of(q).to(torch.int16) - 128).to(torch.int8)}
        else:
            out = {"weight_packed": words_of(q.qweight),
                   "weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64)}
            if not spec.sym:
                out["weight_zero_point"] = words_of(pack_codes(q.zeros.t(), spec.bits)).t()
        out["weight_scale"] = q.scales.to(torch.float16)
        if q.bias is not None:
            out["bias"] = q.bias.to(torch.float16)
        return out

    def quantization_config(self, graph, recipe):
        by_spec: dict = {}
        for name, q in graph.quantized.items():
            by_spec.setdefault(q.spec, []).append(name)
        groups = {}
        for i, (spec, names) in enumerate(by_spec.items()):
            groups[f"group_{i}"] = {"targets": ["Linear"] if len(by_spec) == 1 else names,
                                    "weights": quantization_args(spec),
                                    "input_activations": dict(TOKEN_INT8) if spec.act_bits else None,
                                    "output_activations": None, "format": layer_format(spec)}
        formats = {g["format"] for g in groups.values()}
        ignore = sorted({s.name.split("#")[0] for s in graph.sites.values()} - set(graph.quantized))
        return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else
                "mixed-precision", "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
                "kv_cache_scheme": None, "global_compression_ratio": None,
                "lowbit": {"recipe": recipe.name, "method": recipe.method, "mse": recipe.scheme.mse}}


LOWERING = CompressedTensorsLowering()
