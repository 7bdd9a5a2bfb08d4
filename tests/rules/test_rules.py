"""Fusion rules: every rewrite equals the graph before it on every tiny architecture; the pattern does not
match what it must not; the numeric check catches a wrong rewrite; artifacts record and ship the rewrites."""

import json
import operator
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.recipe import Recipe, load_recipe
from lowbit.passes.settings import Override, Scheme
from lowbit.errors import LowbitError
from lowbit.passes.rtn import rtn_pass
from lowbit.rules import RuleResult, apply_rules
from lowbit.rules.siblings import MergeSiblingMatmuls

from tests.conftest import CAUSAL, MORE_CAUSAL, make_model

# Sibling groups per architecture: Q/K/V (and gate/up) per block where they are separate modules; GPT-2,
# GPT-NeoX, BLOOM and Phi-3 already store them fused as one matrix; Falcon's parallel block merges its fused
# Q/K/V with the MLP's up projection (both read one norm).
MERGES = {"llama": 4, "qwen2": 4, "opt": 2, "gpt2": 0, "mistral": 4, "qwen3": 4, "phi3": 0, "gemma": 4,
          "gemma3_text": 4, "stablelm": 4, "gpt_neox": 0, "bloom": 0, "falcon": 2, "gptj": 2, "phi": 2, "bert": 2}
# Norms feeding only W8A8 matmuls (zq-w8a8): two per block, one where attention and MLP read one norm (GPT-J,
# Phi-2, Falcon); Gemma's computed weight (1 + w) is folded. BERT's post-norm output is also the residual stream.
NORM_FUSES = {"llama": 4, "qwen2": 4, "opt": 4, "gpt2": 4, "mistral": 4, "qwen3": 4, "phi3": 4, "gemma": 4,
              "gemma3_text": 4, "stablelm": 4, "gpt_neox": 4, "bloom": 4, "falcon": 2, "gptj": 2, "phi": 2, "bert": 0}
# Activation x up fusions: one per block where the MLP is gated (SiLU, or GELU-tanh for Gemma) and gate/up are
# one merged matmul (Phi-3 stores them fused and splits with chunk); the other families' MLPs are not gated.
ACT_MULS = {"llama": 2, "qwen2": 2, "opt": 0, "gpt2": 0, "mistral": 2, "qwen3": 2, "phi3": 2, "gemma": 2,
            "gemma3_text": 2, "stablelm": 2, "gpt_neox": 0, "bloom": 0, "falcon": 0, "gptj": 0, "phi": 0, "bert": 0}
# Residual adds folded into the matmul before them: attention output and down projection per block; one where the
# block is parallel (GPT-NeoX, GPT-J, Phi-2, Falcon: the MLP's output takes the attention's as its residual, the
# sum of both then adds the stream). Gemma-3 norms the output before the add; GPT-2 reshapes it (counted).
RESIDUALS = {"llama": 4, "qwen2": 4, "opt": 4, "gpt2": 0, "mistral": 4, "qwen3": 4, "phi3": 4, "gemma": 4,
             "gemma3_text": 0, "stablelm": 4, "gpt_neox": 2, "bloom": 4, "falcon": 2, "gptj": 2, "phi": 2, "bert": 4}
W4 = Recipe("w4g32", "rtn", Scheme(bits=4, group_size=32))


def _quantized(arch, recipe=W4):
    model = make_model(arch)
    task = "encoder" if arch == "bert" else "causal-lm"
    graph = trace(LoadedModel(model, None, model.config, None, task))
    rtn_pass(graph, recipe, show_progress=False)
    return graph


def _outputs(graph):
    """Prefill logits and a cached two-token step (causal LMs), or hidden states (encoders)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, graph.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        if graph.kv is None:
            return [graph(ids, mask)]
        out = graph.gm(*graph.step_args(ids[:, :9], mask[:, :9]))
        step = graph.gm(*graph.step_args(ids[:, 9:], mask, list(out[1:])))
        return [out[0], step[0]]


@pytest.mark.parametrize("arch", list(CAUSAL) + list(MORE_CAUSAL) + ["bert"])
def test_sibling_merge_equals_unmerged_graph(arch):
    graph = _quantized(arch)
    before = _outputs(graph)
    rules = apply_rules(graph)
    info = rules["merge_sibling_matmuls"]
    assert info["fired"] == MERGES[arch], info["rewrites"]
    residual = rules["residual_add"]
    assert residual["fired"] == RESIDUALS[arch], residual
    assert residual["skipped"] == ({"the matmul's output is reshaped before the add": 2} if arch == "gpt2" else {})
    after = _outputs(graph)
    for a, b in zip(after, before):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    linears = [n for n in graph.gm.graph.nodes if n.target is torch.ops.lowbit.wna16_linear.default]
    # Nothing merges across different inputs: each remaining linear reads its own input.
    assert len({n.args[0] for n in linears}) == len(linears)


@pytest.mark.parametrize("arch", list(CAUSAL) + list(MORE_CAUSAL) + ["bert"])
def test_w8a8_siblings_and_norm_quantize_fusions_equal_unfused_graph(arch):
    graph = _quantized(arch, load_recipe("zq-w8a8"))
    before = _outputs(graph)
    info = apply_rules(graph)
    assert info["merge_sibling_matmuls"]["fired"] == MERGES[arch]
    assert info["norm_quant_int8"]["fired"] == NORM_FUSES[arch], info["norm_quant_int8"]
    assert info["act_mul"]["fired"] == ACT_MULS[arch], info["act_mul"]
    assert info["residual_add"]["fired"] == RESIDUALS[arch], info["residual_add"]
    if ACT_MULS[arch]:              # every gated MLP's product feeds only its INT8 down projection
        assert set(info["act_mul"]["rewrites"]) <= {"silu x up + int8 quantize", "gelu_tanh x up + int8 quantize"}
    for a, b in zip(_outputs(graph), before):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    fused = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.lowbit.rmsnorm_quant_int8.default, torch.ops.lowbit.layernorm_quant_int8.default)]
    assert len(fused) == NORM_FUSES[arch]
    if arch == "bert":
        assert info["norm_quant_int8"]["skipped"] == {"the norm's output is also read by a float op": 3}


@pytest.mark.parametrize("arch", list(CAUSAL) + list(MORE_CAUSAL))
def test_activation_times_up_fusion_equals_unfused_graph(arch):
    graph = _quantized(arch)
    before = _outputs(graph)
    info = apply_rules(graph)["act_mul"]
    assert info["fired"] == ACT_MULS[arch], info
    assert info["skipped"] == {}
    for a, b in zip(_outputs(graph), before):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    fused = [n for n in graph.gm.graph.nodes if n.target is torch.ops.lowbit.act_mul.default]
    assert len(fused) == ACT_MULS[arch]
    assert not any(n.target is torch.ops.aten.silu.default for n in graph.gm.graph.nodes) or not ACT_MULS[arch]


def test_activation_times_up_needs_one_merged_matmul():
    """Negative: gate and up in different formats stay two matmuls, so the product of two separate tensors is
    left alone, counted with the reason."""
    graph = _quantized("llama", replace(W4, scheme=replace(W4.scheme, overrides=(Override("*.up_proj", bits=8),))))
    info = apply_rules(graph)["act_mul"]
    assert info["fired"] == 0
    assert info["skipped"] == {"gate and up are separate tensors (not one merged matmul's halves)": 2}


def test_residual_add_needs_the_matmuls_only_reader_and_no_broadcast():
    """The residual rule folds ``residual + linear(x)`` and nothing else: an output also read by another op, or an
    add that broadcasts (a bias), is left alone and counted; what it folds computes the same."""
    from types import SimpleNamespace

    from lowbit.format.quantize import QuantSpec, pack_codes, quantize_weight
    from lowbit.rules.residual_add import ResidualAdd

    q, s, z = quantize_weight(torch.randn(48, 64, generator=torch.Generator().manual_seed(5)), QuantSpec(4, 32))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qw", pack_codes(q, 4))
            self.register_buffer("s", s)
            self.register_buffer("z", z)
            self.register_buffer("b", torch.randn(48))

        def forward(self, x, r):
            lin = [torch.ops.lowbit.wna16_linear(x, self.qw, self.s, self.z, None, 4, 32, 64) for _ in range(3)]
            return lin[0] + r, lin[1] + self.b, lin[2] + r, lin[2] * 2

    x, r = torch.randn(2, 5, 64), torch.randn(2, 5, 48)
    gm = torch.export.export(Block(), (x, r), strict=False).module()
    before = gm(x, r)
    info = ResidualAdd().apply(SimpleNamespace(gm=gm, sites={}))
    assert info.fired == 1 and info.rewrites == ["matmul + residual"]
    assert info.skipped == {"the add broadcasts or changes dtype": 1, "the matmul's output is also read by another op": 1}
    gm.recompile()
    for a, b in zip(gm(x, r), before):
        assert torch.allclose(a, b, atol=1e-6)
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and n.kwargs.get("residual") is not None]
    assert len(fused) == 1


def test_norm_quantize_needs_int8_consumers():
    """Negative: with float activations (W4A16) the norm output is not quantized, so the rule cannot match."""
    info = apply_rules(_quantized("llama"))["norm_quant_int8"]
    assert info["fired"] == 0 and info["skipped"] == {}


def test_siblings_in_different_formats_are_left_alone_with_the_reason():
    recipe = replace(W4, scheme=replace(W4.scheme, overrides=(Override("*.v_proj", bits=8),)))
    graph = _quantized("llama", recipe)
    info = apply_rules(graph)["merge_sibling_matmuls"]
    # Q and K still merge; V (8-bit) stays alone, counted once per block with what differs.
    assert info["skipped"] == {"siblings differ in bits": 2}
    assert all(r.endswith("q_proj+k_proj") or r.endswith("gate_proj+up_proj") for r in info["rewrites"])


class _SwappedSplit(MergeSiblingMatmuls):
    """A wrong rewrite: the merged outputs handed to the siblings in reverse order."""

    name = "swapped_split"

    def apply(self, graph):
        result = super().apply(graph)
        for n in graph.gm.graph.nodes:
            if n.target is operator.getitem and n.args[0].target is torch.ops.aten.split_with_sizes.default:
                sizes = n.args[0].args[1]
                if len(set(sizes)) == 1:          # same-sized siblings: swapping keeps shapes, breaks values
                    n.args = (n.args[0], len(sizes) - 1 - n.args[1])
        return result


def test_numeric_check_rejects_a_wrong_rewrite():
    graph = _quantized("opt")                     # OPT: Q, K and V all [64, 64]
    with pytest.raises(LowbitError, match="swapped_split changed the graph's outputs"):
        apply_rules(graph, [_SwappedSplit()])


def test_rule_result_counts():
    r = RuleResult()
    r.skip("a")
    r.skip("a")
    assert r.to_dict() == {"fired": 0, "rewrites": [], "skipped": {"a": 2}}


def test_artifact_ships_the_merged_graph(model_dirs, tmp_path):
    from lowbit.tools.inspect_artifact import describe

    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", quiet=True)
    m = json.loads((art / "manifest.json").read_text())
    assert m["rules"]["merge_sibling_matmuls"]["fired"] == 4
    program = json.loads((art / "program.json").read_text())
    calls = [n["target"] for n in program["nodes"] if n["op"] == "call"]
    assert calls.count("lowbit::wna16_linear.default") == 2 * 7 - 2 * 3
    assert "merge_sibling_matmuls: fired 4x (q_proj+k_proj+v_proj x2, gate_proj+up_proj x2)" in describe(art)
    assert "| merge_sibling_matmuls | 4 |" in (art / "report.md").read_text()
    unfused = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "b", quiet=True, fuse=False)
    assert "rules" not in json.loads((unfused / "manifest.json").read_text())
    ids = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lowbit.load(art).forward(ids), lowbit.load(unfused).forward(ids), atol=1e-5)
