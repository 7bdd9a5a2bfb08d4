"""Mixed precision under a size budget (passes/budget.py): the Fisher statistics are the loss's own gradients, the
estimate is the second-order loss change it claims, the knapsack meets the budget and beats any uniform choice on
its own estimate, and a budgeted compile writes a plan that compiles again to the same artifact."""

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec, fake_quantize, storage_bytes
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.budget import _hull, choose, estimate, measure
from lowbit.passes.recipe import from_toml, load_recipe, to_toml

from tests.conftest import make_model


def _graph():
    model = make_model("llama")
    return trace(LoadedModel(model, None, model.config, None, "causal-lm")), model


def test_fisher_statistics_are_the_loss_gradients():
    """f and h of one matmul equal the squared gradients of the summed next-token loss with respect to its output
    (autograd on the transformers model, eager attention) and its inputs' squared sums; the control: another
    layer's statistics differ."""
    graph, model = _graph()
    ids = torch.randint(2, graph.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    stats = measure(graph, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"], ids)
    seen = {}
    layer = model.model.layers[1].mlp.down_proj

    def hook(mod, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g))
    handle = layer.register_forward_hook(hook)
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    handle.remove()
    f, h = stats["model.layers.1.mlp.down_proj"]
    assert torch.allclose(f, seen["g"].pow(2).flatten(0, 1).sum(0), rtol=1e-3, atol=1e-9)
    assert torch.allclose(h, seen["x"].pow(2).flatten(0, 1).sum(0), rtol=1e-4)
    assert not torch.allclose(stats["model.layers.0.self_attn.o_proj"][0], f)


def test_estimate_is_the_weighted_error():
    """estimate = 1/(2T) sum_o f_o sum_i D_oi^2 h_i, computed directly; zero for a weight already on the grid."""
    gen = torch.Generator().manual_seed(0)
    w, f, h = torch.randn(8, 64, generator=gen), torch.rand(8, generator=gen), torch.rand(64, generator=gen)
    spec = QuantSpec(3, 32)
    d = w - fake_quantize(w, spec)
    direct = sum(float(f[o] * (d[o] ** 2 * h).sum()) for o in range(8)) / (2 * 10)
    assert estimate(w, spec, f, h, 10) == pytest.approx(direct, rel=1e-5)
    assert estimate(fake_quantize(w, spec), spec, f, h, 10) == pytest.approx(0, abs=1e-9)


def test_choose_meets_the_budget_and_beats_uniform():
    """Random layers with formats whose loss falls with size: the plan fits the budget, its estimated loss is no
    more than every uniform choice that fits, and never more than a brute force over all plans by more than the
    greedy's last step; the hull drops dominated and non-convex points."""
    assert [p[0] for p in _hull([(1, 9.0, "a"), (2, 8.9, "b"), (3, 1.0, "c"), (4, 2.0, "d")])] == [1, 3]
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 2, 3, 5]
    options = {}
    for n in range(6):
        scale = float(torch.rand(1, generator=gen)) * 10
        options[f"l{n}"] = [(s * (n + 1), scale * 2.0 ** -(2 * s), s) for s in sizes]
    total = lambda plan: sum(next(o[1] for o in options[n] if o[2] == f) for n, f in plan.items())
    nbytes = lambda plan: sum(next(o[0] for o in options[n] if o[2] == f) for n, f in plan.items())
    budget = 2.5 * sum(n + 1 for n in range(6))
    plan = choose(options, budget)
    assert nbytes(plan) <= budget
    for s in sizes:
        uniform = {n: s for n in options}
        if nbytes(uniform) <= budget:
            assert total(plan) <= total(uniform)
    with pytest.raises(ValueError):
        choose(options, 0.5 * sum(n + 1 for n in range(6)))


def test_recipe_file_round_trip(tmp_path):
    """to_toml writes what from_toml reads back to an equal Recipe, overrides and budget included."""
    for name in ("gptq-w4g64", "zq-w4a8-mixed-lkd", "awq-gptq-w3g64"):
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(load_recipe(name)))
        assert from_toml(path) == load_recipe(name)
    path = tmp_path / "b.toml"
    path.write_text('method = "gptq"\nbudget_bits = 3.5\nrotate = true\n')
    again = tmp_path / "again.toml"
    again.write_text(to_toml(from_toml(path)))
    assert from_toml(again) == from_toml(path) and from_toml(again).budget_bits == 3.5


@pytest.mark.parametrize("recipe,lkd", [("rtn-w4g32", None), ("ar-w4g64", {"steps": 8, "samples": 4, "seq_len": 32})],
                         ids=["rtn", "learnt-rounding"])
def test_budget_compile_writes_a_plan_that_recompiles(recipe, lkd, model_dirs, tmp_path):
    """--budget-bits 3.5 on a tiny Llama: the layers' stored bits fit, more than one format is chosen, the manifest
    and report record the plan, and compiling plan.toml (no budget in it) gives the same weights. With learnt
    rounding each layer learns in its planned format, and plan.toml holds the LKD settings the compile ran."""
    from lowbit.compiler.pipeline import CalibrationArgs
    from tests.conftest import sample_text

    text = tmp_path / "calib.txt"
    text.write_text(sample_text(3000, 2))
    calib = CalibrationArgs(str(text), samples=4, seq_len=32)
    out = lowbit.compile(model_dirs["llama"], recipe=recipe, out=tmp_path / "plan", quiet=True, calib=calib,
                         budget_bits=3.5, lkd=lkd)
    m = json.loads((out / "manifest.json").read_text())
    assert m["budget"]["bits_per_weight"] <= 3.5 and len(m["budget"]["formats"]) > 1
    assert m["recipe"]["overrides"] and "budget_bits" not in m["recipe"]
    layers = json.loads((out / "graph.json").read_text())["layers"]
    assert {n: f"w{v['bits']}g{v['recipe_group_size']}" for n, v in layers.items()} == m["budget"]["layers"]
    weights = sum(v["out_features"] * v["in_features"] for v in layers.values())
    stored = sum(storage_bytes(v["out_features"], v["in_features"], QuantSpec(v["bits"], v["recipe_group_size"]))
                 for v in layers.values())
    assert stored * 8 / weights == pytest.approx(m["budget"]["bits_per_weight"], abs=1e-3)
    again = lowbit.compile(model_dirs["llama"], recipe=str(out / "plan.toml"), out=tmp_path / "again", quiet=True,
                           calib=calib)
    assert (again / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()
    if lkd:
        assert all(b["kept"] for b in m["lkd"]["blocks"].values())
        assert json.loads((again / "manifest.json").read_text())["recipe"]["lkd_steps"] == 8


def test_budget_refusals(model_dirs, tmp_path, capsys):
    """A budget below the smallest formats, a negative one, one on W8A8 and on a float recipe: one line, exit 2,
    nothing left behind."""
    before = set(tmp_path.iterdir())
    for args, expect in ((["-r", "rtn-w4g32", "--budget-bits", "1.5"], "below the smallest"),
                         (["-r", "rtn-w4g32", "--budget-bits", "-1"], "--budget-bits must be"),
                         (["-r", "zq-w8a8", "--budget-bits", "4"], "weight-only"),
                         (["-r", "fp", "--budget-bits", "4"], "method 'fp'")):
        code = main(["compile", str(model_dirs["llama"]), "-o", str(tmp_path / "o"), "--calib-seq-len", "32",
                     "--calib-samples", "2", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], (args, err)
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(LowbitError, match="bits per weight"):
        load_recipe("rtn-w4g32").__class__(budget_bits=float("nan"))
