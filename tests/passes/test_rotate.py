"""Rotations (passes/rotate.py): exact in float on every RMSNorm architecture (with norm weights and biases that are
not ones and zeros, so a missed fold shows), wrong when any part is left out, refused with the reason elsewhere;
a rotated recipe compiles to the torch and ONNX targets, and is refused where it cannot be held."""

import json
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.exact import check_unchanged
from lowbit.passes.recipe import load_recipe
from lowbit.passes.rotate import (_rotate_columns, _rotate_rows, apply_plan, down_projections, find_plan, online_pass,
                                  online_sites, orthogonal, orthogonal_parts, rotate_pass)

from tests.conftest import make_model

ROTATED = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma")
# What each refused architecture's message names.
ADDED = "not the output of a matmul"
REFUSED = {"opt": "embed_positions", "gpt2": "wpe", "gemma3_text": "post_attention_layernorm",
           "stablelm": "LayerNorm", "bloom": "LayerNorm", "gpt_neox": ADDED, "falcon": ADDED, "gptj": ADDED,
           "phi": ADDED}


def _graph(arch):
    """A tiny model's graph whose 1-D parameters (norm weights, biases) are random, not ones and zeros."""
    model = make_model(arch)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return trace(LoadedModel(model, None, model.config, None, "causal-lm"))


def _probe(graph):
    return torch.randint(2, graph.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("n", [1, 9, 64, 576, 640])
def test_orthogonal(n):
    """Q Q^T = I for powers of two and the rest; the same seed gives the same Q; no entry dominates."""
    q = orthogonal(n)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(n)) and (n == 1 or not torch.equal(q, orthogonal(n, seed=1)))
    assert float(q.abs().max()) * n ** 0.5 < 3.5


@pytest.mark.parametrize("arch", ROTATED)
def test_rotation_is_exact_in_float(arch):
    """The rotated graph's logits are the float graph's to float32 rounding; its norm weights are the identity;
    a head tied to the embedding gets its own table."""
    graph = _graph(arch)
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    info = rotate_pass(graph)
    assert check_unchanged(graph, probe, before, "test") < 1e-5
    assert info["norms"] == 5 and info["writers"] == 4 and info["values"] == (0 if arch == "phi3" else 2)
    plan = find_plan(graph)
    for weight, offset, _ in plan.norms:
        assert torch.equal(graph.attr(weight) + offset, torch.ones_like(graph.attr(weight)))
    head = graph.sites["lm_head"]
    assert head.weight_attr != plan.embedding
    assert info["untied"] == (["lm_head"] if arch in ("llama", "gemma") else [])


@pytest.mark.parametrize("part", ["writers", "values", "norm weights", "untie"])
def test_each_part_is_needed(part):
    """Controls: leaving out the down projections' rotation or the output projections' half of the values',
    keeping the norms' weights beside their fold into the readers, or a head that reads the rotated embedding
    table (still tied) moves the logits by more than the check allows."""
    graph = _graph("llama")
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    plan = find_plan(graph)
    norm_weights = {w: graph.attr(w).detach().clone() for w, _, _ in plan.norms}
    if part == "writers":
        plan.writers = [s for s in plan.writers if not s.name.endswith("down_proj")]
    values, plan.values = plan.values, ([] if part == "values" else plan.values)
    apply_plan(graph, plan, orthogonal(64))
    if part == "values":                    # the value projections rotated, the output projections not
        for v, _ in values:
            _rotate_rows(graph, v, torch.block_diag(*[orthogonal(16)] * (v.out_features // 16)))
    elif part == "norm weights":
        for w, t in norm_weights.items():
            graph.set_constant(w, t)
    elif part == "untie":
        graph.set_constant(graph.sites["lm_head"].weight_attr, graph.attr(plan.embedding).detach().clone())
    with pytest.raises(LowbitError, match="changed the float model's logits"):
        check_unchanged(graph, probe, before, "rotation")


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_refused_with_the_reason(arch):
    """LayerNorm models, Gemma-3's norms after attention and MLP, position embeddings and parallel blocks added to
    the residual stream: one line naming what cannot be rotated, before any weight changes."""
    graph = _graph(arch)
    with pytest.raises(LowbitError) as e:
        find_plan(graph)
    msg = str(e.value)
    assert REFUSED[arch] in msg and "without rotate" in msg and "\n" not in msg, msg


# The matmul that reads each MLP's elementwise product (a gated MLP's act(gate) * up; BLOOM's and GPT-J's GELU
# written as a product).
# Phi-3 splits a merged gate/up output; BLOOM is a LayerNorm model whose GELU is a product.
PRODUCTS = {"llama": "mlp.down_proj", "phi3": "mlp.down_proj", "bloom": "mlp.dense_4h_to_h"}


def _online(which):
    return replace(load_recipe("zq-w8a8"), online_rotate=which)


@pytest.mark.parametrize("arch", sorted(PRODUCTS))
def test_online_rotation_is_exact_in_float(arch):
    """Every MLP's output projection reads a lowbit::rotate of the product and holds W Q: the logits stay the float
    graph's, with or without the residual rotation before it."""
    graph = _graph(arch)
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    if arch in ROTATED:
        rotate_pass(graph)
    sites = down_projections(graph)
    assert len(sites) == 2 and all(s.name.endswith(PRODUCTS[arch]) for s in sites), [s.name for s in sites]
    info = online_pass(graph, _online("down"))
    assert check_unchanged(graph, probe, before, "test") < 1e-5
    assert info["matmuls"] == info["rotations"] == len(sites) and info["max_rel_diff"] < 1e-5
    assert all(s.input_node.target is torch.ops.lowbit.rotate.default for s in sites)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_online_rotation_of_every_input_is_exact(arch):
    """online_rotate = "all": every quantized matmul reads a rotation, one per input it shares with others (Q/K/V,
    gate/up), on models the residual rotation refuses (GPT-2's Conv1D weights stored [K, N]; Gemma-3)."""
    graph = _graph(arch)
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    recipe = _online("all")
    sites = online_sites(graph, recipe)
    inputs = {s.input_node for s in sites}
    info = online_pass(graph, recipe)
    assert check_unchanged(graph, probe, before, "test") < 1e-5
    assert info["matmuls"] == len(sites) and info["rotations"] == len(inputs)
    assert arch == "gpt2" or len(inputs) < len(sites)             # GPT-2's Q/K/V is one matmul
    assert all(s.input_node.target is torch.ops.lowbit.rotate.default for s in sites)


def test_online_rotation_unties_a_quantized_head():
    """"all" with the head quantized: the head tied to the embedding gets its own table before its columns turn, so
    the embedding stays the model's (the logits check would refuse otherwise)."""
    graph = _graph("llama")
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    recipe = replace(_online("all"), scheme=replace(load_recipe("zq-w8a8").scheme, quantize_lm_head=True))
    assert "lm_head" in {s.name for s in online_sites(graph, recipe)}
    online_pass(graph, recipe)
    assert check_unchanged(graph, probe, before, "test") < 1e-5
    assert graph.sites["lm_head"].weight_attr != graph.embeddings[graph.input_embedding].weight_attr


def test_online_rotation_needs_the_weight_side():
    """The control: the activations rotated but the down projections' weights left as they were change the logits
    (and the check names it); the rotation the op computes is the Q the weights hold."""
    graph = _graph("llama")
    probe = _probe(graph)
    before = check_unchanged(graph, probe)
    sites = down_projections(graph)
    online_pass(graph, _online("down"))
    signs, r, h = orthogonal_parts(sites[0].in_features, 2)
    q = signs[:, None] * torch.kron(r, h)
    for site in sites:
        _rotate_columns(graph, site, q.t())                   # W Q -> W: the weights undo their half
    with pytest.raises(LowbitError, match="changed the float model's logits"):
        check_unchanged(graph, probe, before, "online rotation")
    for site in sites:
        _rotate_columns(graph, site, q)
    assert check_unchanged(graph, probe, before, "test") < 1e-5


def test_online_rotation_refused_without_a_product():
    with pytest.raises(LowbitError, match="this model has none; use online_rotate = \"all\"") as e:
        online_sites(_graph("gpt2"), _online("down"))
    assert "\n" not in str(e.value)


def test_rotated_recipes_compile(model_dirs, tmp_path):
    """A rotated 8-bit RTN recipe stays at the float model's logits through the whole pipeline (fusion rules and
    lowering included) and rotated 4-bit GPTQ near them; the manifest records the rotation; the ONNX target's logits
    under ONNX Runtime are the torch reference kernels', online rotations (lowbit::rotate as ONNX operators)
    included."""
    from lowbit.compiler.pipeline import CalibrationArgs
    from tests.conftest import sample_text

    text = tmp_path / "calib.txt"
    text.write_text(sample_text(3000, 2))
    calib = CalibrationArgs(str(text), samples=4, seq_len=32)
    ids = torch.randint(2, 200, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = lowbit.load(lowbit.compile(model_dirs["llama"], recipe="fp", out=tmp_path / "fp", quiet=True))
    ref_logits = ref.forward(ids).float()
    for name, body, bound in (("w8", 'method = "rtn"\nbits = 8\ngroup_size = 0\n', 0.02),
                              ("w8a8-online", 'method = "rtn"\nbits = 8\ngroup_size = 0\nsym = true\nact_bits = 8\n'
                                              'online_rotate = "down"\n', 0.05),
                              ("gptq", 'method = "gptq"\nbits = 4\ngroup_size = 32\nonline_rotate = "all"\n', 0.5)):
        recipe = tmp_path / f"rot-{name}.toml"
        recipe.write_text(body + "rotate = true\n")
        out = lowbit.compile(model_dirs["llama"], recipe=str(recipe), out=tmp_path / name, quiet=True, calib=calib)
        m = json.loads((out / "manifest.json").read_text())
        assert m["recipe"]["rotate"] is True and m["rotate"]["untied"] == ["lm_head"]
        assert m["rotate"]["max_rel_diff"] < 1e-4
        online = "online_rotate" in body
        assert ("online_rotate" in m) == online and (not online or m["online_rotate"]["max_rel_diff"] < 1e-4)
        assert json.loads((out / "program.json").read_text())["op_table"] == (2 if online else 1)
        rel = float((lowbit.load(out).forward(ids).float() - ref_logits).abs().max() / ref_logits.abs().max())
        assert rel < bound, (name, rel)
    onnx = lowbit.compile(model_dirs["llama"], recipe=str(recipe), target="onnx", out=tmp_path / "onnx", quiet=True,
                          calib=calib)
    torch_logits = lowbit.load(onnx, backend="torch", kernels="reference").forward(ids).float()
    ort_logits = torch.as_tensor(lowbit.load(onnx, backend="ort").forward(ids)).float()
    assert float((ort_logits - torch_logits).abs().max() / torch_logits.abs().max()) < 1e-3


def test_rotate_refusals(model_dirs, tmp_path, capsys):
    """hf-gptq (for the asymmetric scheme, not the rotation), a float method, rotate with lkd and a model that cannot
    be rotated; the online rotation in the exports (no engine of theirs runs it), with lkd and on a model without an
    MLP product: one line each, exit 2, nothing left behind."""
    before = set(tmp_path.iterdir())
    files = {}
    for name, body in (("gptq", 'method = "gptq"\nrotate = true\n'),
                       ("rtn", 'method = "rtn"\ngroup_size = 32\nrotate = true\n'),
                       ("fp", 'method = "fp"\nrotate = true\n'),
                       ("lkd", 'method = "rtn"\nrotate = true\nlkd = true\n'),
                       ("online", 'method = "rtn"\ngroup_size = 32\nsym = true\nonline_rotate = "down"\n'),
                       ("online-lkd", 'method = "rtn"\nonline_rotate = "down"\nlkd = true\n'),
                       ("online-bad", 'method = "rtn"\nonline_rotate = "mlp"\n')):
        files[name] = tmp_path / f"{name}.toml"
        files[name].write_text(body)
    for model, recipe, target, expect in (
            ("llama", "gptq", "hf-gptq", "--target hf-awq or --target compressed-tensors can hold it"), ("llama", "fp", "torch", "rotate = true"),
            ("llama", "lkd", "torch", "rotate and lkd"), ("opt", "rtn", "torch", "cannot be folded"),
            ("llama", "online", "hf-gptq", "drop online_rotate; lowbit's own targets (torch, onnx) run it"),
            ("llama", "online", "gguf", "no operator for the online rotation"),
            ("llama", "online-lkd", "torch", "online_rotate and lkd"), ("opt", "online", "torch", "has none"),
            ("llama", "online-bad", "torch", "online_rotate must be one of 'down', 'all', got 'mlp'")):
        code = main(["compile", str(model_dirs[model]), "-o", str(tmp_path / "o"), "-r", str(files[recipe]),
                     "--target", target])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], err
    assert set(tmp_path.iterdir()) == before | set(files.values())
