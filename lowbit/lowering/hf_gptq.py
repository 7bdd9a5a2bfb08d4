"""Lowering to the standard GPTQ checkpoint (target ``hf-gptq``), servable by transformers, vLLM, GPTQModel.

The artifact is an ordinary transformers model folder (``config.json`` with ``quantization_config``,
``model.safetensors``, tokenizer) plus lowbit's manifest. Layout per quantized linear ``L`` (GPTQ "v1",
``checkpoint_format: gptq``), bits b in {4, 8}, f = 32 / b codes per int32:

- ``L.qweight`` int32 [K / f, N]: ``qweight[i, n] = sum_j code[n, f*i + j] << (b*j)`` (packed along K)
- ``L.qzeros``  int32 [G, N / f]: ``qzeros[g, i] = sum_j (zero[f*i + j, g] - 1) << (b*j)`` (along N, minus one)
- ``L.scales``  float16 [G, N];  ``L.g_idx`` int32 [K] = k // group_size;  ``L.bias`` float16 [N]

G = ceil(K / group_size). lowbit's act-order uses static groups, so groups are contiguous and g_idx is
the identity grouping: ``desc_act`` is written as false (readers then need no reordering); the
``lowbit`` entry of the config records that act-order was used. Zero points are at least 1 (the
pipeline asks the passes for ``min_zero = 1``) so "zero - 1" never underflows.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.format.quantize import unpack_codes

SUPPORTED_BITS = (4, 8)


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, C] -> int32 [R * bits / 32, C], f = 32/bits consecutive rows per word, low bits first."""
    f = 32 // bits
    r, c = codes.shape
    grouped = codes.to(torch.int64).view(r // f, f, c)
    shifts = (torch.arange(f, dtype=torch.int64) * bits).view(1, f, 1)
    words = (grouped << shifts).sum(dim=1)
    # Reinterpret the unsigned 32-bit word as int32 (two's complement), as GPTQ readers do.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def check_exportable(graph, recipe):
    """Before any pass runs: refuse what the GPTQ config (one bits/group setting for all) cannot say."""
    from lowbit.passes.rtn import quantizable

    planned = list(quantizable(graph, recipe))
    if not planned:
        raise LowbitError("target hf-gptq needs quantized weights; use a gptq or rtn recipe, not 'fp'")
    if recipe.scheme.quantize_embeddings:
        raise LowbitError("target hf-gptq cannot store a quantized embedding; set quantize_embeddings = false")
    first_site, first = planned[0]
    for site, spec in planned:
        if spec.act_bits:
            raise LowbitError(f"target hf-gptq is weight-only; layer {site.name} has INT{spec.act_bits} activations "
                              "(use --target torch or onnx for W8A8 recipes)")
        if spec.bits not in SUPPORTED_BITS:
            raise LowbitError(f"target hf-gptq supports {' and '.join(map(str, SUPPORTED_BITS))}-bit weights; "
                              f"layer {site.name} would have {spec.bits} bits")
        f = 32 // spec.bits
        if site.in_features % f or site.out_features % f:
            raise LowbitError(f"target hf-gptq packs {f} codes per int32: layer {site.name} has K={site.in_features}, "
                              f"N={site.out_features}, which must both be multiples of {f}")
        if (spec.bits, max(spec.group_size, 0), spec.sym) != (first.bits, max(first.group_size, 0), first.sym):
            raise LowbitError("target hf-gptq needs one bits/group/sym setting for every quantized layer; "
                              f"{first_site.name} and {site.name} differ (remove the recipe's overrides)")
    names = {site.name for site, _ in planned}
    unquantized = [s.name for s in graph.sites.values() if s.name not in names and s.name != "lm_head"]
    if unquantized:
        raise LowbitError(f"target hf-gptq needs every block linear quantized; {unquantized[0]} would stay float "
                          "(remove 'skip' overrides)")


def layer_tensors(q) -> dict[str, torch.Tensor]:
    codes = unpack_codes(q.qweight, q.spec.bits, q.in_features)          # [N, K]
    k = q.in_features
    out = {"qweight": pack_along_rows(codes.t().contiguous(), q.spec.bits),
           "qzeros": _pack_zeros(q),
           "scales": q.scales.t().contiguous().to(torch.float16),
           "g_idx": (torch.arange(k, dtype=torch.int32) // q.group_size).to(torch.int32)}
    if q.bias is not None:
        out["bias"] = q.bias.to(torch.float16)
    return out


def _pack_zeros(q) -> torch.Tensor:
    """zeros uint8 [N, G] -> int32 [G, N * bits / 32] holding zero - 1, packed along N."""
    z = (q.zeros.to(torch.int64) - 1)                     # >= 0: zero points are at least 1
    if int(z.min()) < 0:
        raise LowbitError(f"layer {q.name} has a zero point of 0, which the GPTQ layout (zero - 1) cannot store; "
                          "recompile with --target hf-gptq so the passes keep zero points >= 1")
    return pack_along_rows(z.to(torch.uint8), q.spec.bits).t().contiguous()     # [N/f, G] -> [G, N/f]


def write_hf_gptq(tmp, graph, loaded, recipe) -> dict:
    """Write the GPTQ checkpoint folder into ``tmp``; returns size accounting for the manifest."""
    from lowbit.lowering.program import artifact_tensors, size_report

    tensors = {}
    for key, t in artifact_tensors(graph, loaded.model).items():
        name, _, leaf = key.rpartition(".")
        if name in graph.quantized:
            continue
        tensors[key] = t.to(torch.float16) if t.is_floating_point() else t
    for name, q in graph.quantized.items():
        for leaf, t in layer_tensors(q).items():
            tensors[f"{name}.{leaf}"] = t
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    first = next(iter(graph.quantized.values()))
    config = loaded.config.to_dict()
    config["torch_dtype"] = config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": first.spec.bits,
        "group_size": first.spec.group_size if first.spec.group_size > 0 else -1,
        "desc_act": False, "sym": first.spec.sym, "true_sequential": True, "damp_percent": recipe.gptq.damp,
        "static_groups": recipe.gptq.static_groups, "checkpoint_format": "gptq", "lm_head": "lm_head" in graph.quantized,
        "lowbit": {"method": recipe.method, "act_order": recipe.gptq.act_order, "mse": recipe.scheme.mse}}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)
    return size_report(graph, loaded.model, (tmp / "model.safetensors").stat().st_size)


class HfGptqLowering:
    """The ``hf-gptq`` target (``lowbit.targets``): transformers' layer layout, so no fusion rewrites."""
    fuse = False
    streams = False          # writes from the transformers model's state dict
    dtypes = ("auto", "float16")         # the GPTQ checkpoint's float16

    def prepare(self, recipe, options=None):
        for key, what in (("awq", "the norm weights it scales (awq)"),
                          ("rotate", "the rotated embedding and norms (rotate)")):
            if getattr(recipe, key):
                raise LowbitError(f"target hf-gptq writes the model's own float tensors, not {what} of recipe "
                                  f"'{recipe.name}'; use --target torch or onnx, or a recipe without {key}")
        # The GPTQ layout stores "zero - 1": ask the passes for zero points >= 1.
        return replace(recipe, scheme=replace(recipe.scheme, min_zero=1))

    def check(self, graph, recipe):
        check_exportable(graph, recipe)

    def write(self, tmp, graph, loaded, recipe, options, timings: dict, quiet: bool) -> dict:
        from lowbit.progress import timed

        with timed(timings, "write", quiet, "writing the GPTQ checkpoint"):
            return {"sizes": write_hf_gptq(tmp, graph, loaded, recipe)}


LOWERING = HfGptqLowering()
