"""Mixed precision under a size budget (passes/budget.py): the Fisher statistics are the loss's own gradients, the
estimate is the second-order loss change it claims, the knapsack meets the budget and beats any uniform choice on
its own estimate, and a budgeted compile writes a plan that compiles again to the same artifact."""

import json
from dataclasses import asdict, replace

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec, fake_quantize, storage_bytes
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.budget import _hull, choose, errors, estimate, measure
from lowbit.passes.gptq import GPTQOptions, gptq_quantize
from lowbit.passes.rtn import quantizable
from lowbit.passes.recipe import from_toml, load_recipe, to_toml

from tests.conftest import make_model


def _graph():
    model = make_model("llama")
    return trace(LoadedModel(model, None, model.config, None, "causal-lm")), model


def _down_proj_run(model, ids):
    """(inputs [T, K], output gradients [T, N]) of layer 1's down_proj in the transformers model (eager attention)
    under the summed next-token loss."""
    seen = {}
    layer = model.model.layers[1].mlp.down_proj

    def hook(mod, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g))
    handle = layer.register_forward_hook(hook)
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    handle.remove()
    return seen["x"].flatten(0, 1), seen["g"].flatten(0, 1)


DOWN = "model.layers.1.mlp.down_proj"


def test_fisher_statistics_are_the_loss_gradients():
    """f of one matmul equals the squared gradients of the summed next-token loss with respect to its output
    (autograd on the transformers model); the control: another layer's statistics differ."""
    graph, model = _graph()
    ids = torch.randint(2, graph.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    f = measure(graph, [DOWN, "model.layers.0.self_attn.o_proj"], ids)
    _, g = _down_proj_run(model, ids)
    assert torch.allclose(f[DOWN], g.pow(2).sum(0), rtol=1e-3, atol=1e-9)
    assert not torch.allclose(f["model.layers.0.self_attn.o_proj"], f[DOWN])


def test_estimate_is_the_weighted_output_error():
    """estimate = 1/(2T) sum_t sum_o f_o (D x_t)_o^2, computed token by token from the inputs; zero for no error."""
    gen = torch.Generator().manual_seed(0)
    d, f, x = torch.randn(8, 64, generator=gen), torch.rand(8, generator=gen), torch.randn(10, 64, generator=gen)
    direct = float(((x @ d.T) ** 2 * f).sum()) / (2 * 10)
    assert estimate(d, f, 2 / 10 * x.T @ x) == pytest.approx(direct, rel=1e-5)
    assert estimate(torch.zeros_like(d), f, 2 / 10 * x.T @ x) == 0


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_format_errors_are_the_methods_error_on_the_layers_inputs(method):
    """Each format's estimate for down_proj is the recipe's own rounding (GPTQ with the Hessian of the layer's
    inputs in the transformers model, or round-to-nearest) weighed per token; GPTQ's is the smaller, and the
    narrower format costs more. The control: the other method's error gives another estimate."""
    graph, model = _graph()
    ids = torch.randint(2, graph.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    recipe = replace(load_recipe("gptq-w4g64"), method=method)
    layers = [(s, spec) for s, spec in quantizable(graph, recipe) if s.name == DOWN]
    fisher = measure(graph, [DOWN], ids)
    options = errors(graph, recipe, layers, [(3, 32), (4, 32)], fisher, ids)[DOWN]
    x, g = _down_proj_run(model, ids)
    w = model.model.layers[1].mlp.down_proj.weight.detach().float()
    hessian = 2 / len(x) * x.T @ x
    opts = GPTQOptions(**asdict(recipe.gptq), mse=recipe.scheme.mse)
    per_token = lambda q: float(((x @ (w - q).T) ** 2 * g.pow(2).sum(0)).sum()) / (2 * len(x))
    for (size, est, fmt), (bits, group) in zip(options, [(3, 32), (4, 32)]):
        spec = replace(layers[0][1], bits=bits, group_size=group)
        gptq = gptq_quantize(w, hessian, spec, opts).dequant
        rtn = fake_quantize(w, spec)
        assert fmt == (bits, group) and size == storage_bytes(w.shape[0], w.shape[1], spec)
        mine, other = (gptq, rtn) if method == "gptq" else (rtn, gptq)
        assert est == pytest.approx(per_token(mine), rel=1e-3)
        assert est != pytest.approx(per_token(other), rel=1e-2)
        assert per_token(gptq) < per_token(rtn)
    assert options[0][1] > options[1][1]


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
    ratios = m["budget"]["other_budgets"]                  # the same knapsack at other budgets: loss falls with size
    assert ratios["3.5"] == m["budget"]["estimated_ppl_ratio"] >= 1
    assert list(ratios.values()) == sorted(ratios.values(), reverse=True) and ratios["5"] < ratios["3"]
    assert f"{m['budget']['estimated_ppl_ratio']:.3f}x float" in (out / "report.md").read_text()
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
