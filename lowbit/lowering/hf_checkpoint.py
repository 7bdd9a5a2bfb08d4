"""What the transformers checkpoint exports share (targets hf-gptq, hf-awq, compressed-tensors).

Each writes an ordinary transformers model folder that other engines load: the model's float tensors as the passes
left them (float16; AWQ's scaled norms, a rotated embedding and head: every graph-level fold is an ordinary weight),
its quantized linears in the format's layout, ``config.json`` whose ``quantization_config`` names the
format, and the tokenizer. A format holds some recipes and not others, and the weights it stores are exactly the
ones the passes produced (no target changes them): a subclass states what it holds with ``spec_refusal`` (one
layer's format) and ``shape_refusal`` (its shape), and a recipe it cannot hold is refused before any work, naming
the exports that can hold it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec, unpack_codes

def recipe_specs(recipe) -> list[QuantSpec]:
    """Every format a recipe can give a matmul: its scheme's, and each (non-skip) override's."""
    s = recipe.scheme
    base = QuantSpec(s.bits, s.group_size, s.sym, s.act_bits)
    out = [base]
    for o in s.overrides:
        spec = replace(base, **o.changes())
        if not o.skip and spec not in out:
            out.append(spec)
    return out


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) reinterpreted as int32, two's complement, as the readers store them."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def codes_of(q) -> torch.Tensor:
    """A quantized layer's unsigned codes, uint8 [N, K]."""
    return unpack_codes(q.qweight, q.spec.bits, q.in_features)


# The exports are read by engines that run the model's own layers: no operator rotates activations.
ONLINE_REFUSAL = ("its engines run the model's own layers, with no operator for the online rotation of activations; "
                  "drop online_rotate")


def exports_holding(recipe, besides: str) -> list[str]:
    """The export targets (those lowbit's runtime does not run) other than ``besides`` that hold ``recipe``."""
    from lowbit import targets

    out = []
    for name, t in targets.TARGETS.items():
        if name != besides and not t.backends:
            refusal = getattr(targets.lowering(name), "refusal", None)
            if refusal is not None and refusal(recipe) is None:
                out.append(name)
    return out


class CheckpointLowering:
    """A transformers-folder export. Subclasses set ``name``, ``title`` (what the folder is, for progress),
    ``uniform`` (the config states one format for every quantized layer, so each block linear must have it) and
    provide ``spec_refusal(spec)``, ``layer_tensors(q)`` and ``quantization_config(graph, recipe)``."""
    fuse = False             # transformers' layer layout: no fusion rewrites
    streams = False          # writes from the transformers model's state dict
    dtypes = ("auto", "float16")         # the checkpoint's float16
    name = title = ""
    uniform = True

    def spec_refusal(self, spec: QuantSpec) -> str | None:
        raise NotImplementedError

    def shape_refusal(self, name: str, k: int, n: int, spec: QuantSpec) -> str | None:
        return None

    def layer_tensors(self, q) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, graph, recipe) -> dict:
        raise NotImplementedError

    def refusal(self, recipe) -> str | None:
        """Why this format cannot hold ``recipe`` whatever the model, or None."""
        if not recipe.quantizes:
            return "it needs quantized weights; use a gptq or rtn recipe, not 'fp'"
        if recipe.scheme.quantize_embeddings:
            return "it cannot store a quantized embedding; set quantize_embeddings = false"
        if recipe.online_rotate:
            return ONLINE_REFUSAL
        if self.uniform and recipe.budget_bits:
            return "its config states one format for every layer, and a size budget plans one per layer"
        for spec in recipe_specs(recipe):
            why = self.spec_refusal(spec)
            if why:
                return why
        return None

    def refuse(self, recipe, why: str) -> LowbitError:
        able = exports_holding(recipe, self.name)
        hint = (f"--target {' or --target '.join(able)} can hold it" if able else
                "lowbit's own targets (torch, onnx) run it")
        return LowbitError(f"target {self.name} cannot hold recipe '{recipe.name}': {why}; {hint}")

    def prepare(self, recipe, options=None):
        why = self.refusal(recipe)
        if why:
            raise self.refuse(recipe, why)
        return recipe

    def check(self, graph, recipe):
        """After tracing, before any pass: each layer's format and shape, and one format for all when uniform."""
        from lowbit.passes.rtn import quantizable

        planned = list(quantizable(graph, recipe))
        if not planned:
            raise LowbitError(f"target {self.name} needs quantized weights; recipe '{recipe.name}' quantizes no "
                              "layer of this model")
        for site, spec in planned:
            why = self.spec_refusal(spec) or self.shape_refusal(site.name, site.in_features, site.out_features, spec)
            if why:
                raise LowbitError(f"target {self.name} cannot hold layer {site.name}: {why}")
        if not self.uniform:
            return
        first_site, first = planned[0]
        for site, spec in planned:
            if spec != first:
                raise LowbitError(f"target {self.name} needs one bits/group/sym setting for every quantized layer; "
                                  f"{first_site.name} and {site.name} differ (remove the recipe's overrides, or use "
                                  "--target compressed-tensors)")
        names = {site.name for site, _ in planned}
        unquantized = [s.name for s in graph.sites.values() if s.name not in names and s.name != "lm_head"]
        if unquantized:
            raise LowbitError(f"target {self.name} needs every block linear quantized; {unquantized[0]} would stay "
                              "float (remove 'skip' overrides, or use --target compressed-tensors)")

    def write(self, tmp, graph, loaded, recipe, options, timings: dict, quiet: bool) -> dict:
        from lowbit.progress import timed

        with timed(timings, "write", quiet, f"writing {self.title}"):
            return {"sizes": self.write_folder(tmp, graph, loaded, recipe)}

    def write_folder(self, tmp, graph, loaded, recipe) -> dict:
        """The model folder in ``tmp``: float16 float tensors, each quantized layer's tensors, config, tokenizer;
        returns size accounting for the manifest."""
        from lowbit.lowering.program import artifact_tensors, size_report, untied_head, write_layers

        tensors = {}
        for key, t in artifact_tensors(graph, loaded.model).items():
            if key.rpartition(".")[0] in graph.quantized:
                continue
            tensors[key] = t.to(torch.float16) if t.is_floating_point() else t
        for name, q in graph.quantized.items():
            for leaf, t in self.layer_tensors(q).items():
                tensors[f"{name}.{leaf}"] = t.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = loaded.config.to_dict()
        config["torch_dtype"] = config["dtype"] = "float16"
        if untied_head(graph, loaded.config):
            config["tie_word_embeddings"] = False
        config["quantization_config"] = self.quantization_config(graph, recipe)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        write_layers(tmp, graph)
        return size_report(graph, loaded.model, (tmp / "model.safetensors").stat().st_size)
