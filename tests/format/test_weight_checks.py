"""Weight checks of a compile: a NaN/Inf in the checkpoint is refused at load, naming the tensor; a group that one
outlier weight stretches is flagged in the layer's stats, the compile warnings and report.md."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.cli import main
from lowbit.frontend.load import check_finite, load_model
from lowbit.compiler.report import MAX_WARNED_LAYERS, outlier_lines
from lowbit.format.quantize import QuantSpec, dequantize_codes, group_error_stats
from lowbit.passes.gptq import gptq_quantize
from lowbit.passes.rtn import quantize_layer

from tests.conftest import make_model

W4G64 = QuantSpec(4, 64)


def corrupt_checkpoint(folder, name: str, at: tuple, value: float):
    """Write ``value`` into tensor ``name`` of the folder's model.safetensors, as a damaged download would."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name][at] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama"
    make_model("llama", seed=3).save_pretrained(d)
    return d


def test_nan_weight_refused_at_load_with_its_name(llama_dir, tmp_path, capsys):
    load_model(str(llama_dir))                              # negative control: the clean checkpoint loads
    corrupt_checkpoint(llama_dir, "model.layers.1.mlp.up_proj.weight", (17, 5), float("nan"))
    assert main(["compile", str(llama_dir), "-r", "rtn-w4g64", "-o", str(tmp_path / "art"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lowbit: error: model weight model.layers.1.mlp.up_proj.weight holds 1 NaN value; the checkpoint "
                   "is corrupted (re-download or re-convert it)")
    assert not (tmp_path / "art").exists()


def test_inf_weight_refused_with_counts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    check_finite(model)                                     # random finite weights pass
    with torch.no_grad():
        model[0].weight[:4] = 3e38                          # finite, though their sum overflows float32
    check_finite(model)
    with torch.no_grad():
        model[1].weight[0, :2] = float("nan")
        model[1].weight[2, 3] = float("-inf")
        model[2].bias[0] = float("inf")
    with pytest.raises(lowbit.LowbitError, match=r"^model weight 1\.weight holds 2 NaN and 1 Inf values \(and 1 more "
                                                 r"weight tensors hold NaN or Inf\); the checkpoint is corrupted"):
        check_finite(model)


def random_weight(seed: int, n: int = 48, k: int = 256, std: float = 0.02) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * std


def where(group: dict) -> tuple:
    return group["row"], group["group"]


@pytest.mark.parametrize("value", [1e4, 15 * 512.0])    # 7680 lands exactly on a float16 scale: no error of its own
def test_rtn_stats_flag_exactly_the_outlier_group(value):
    w = random_weight(1)
    clean = quantize_layer("clean", "wna16_linear", w, W4G64, None).stats
    assert clean["outlier_groups"] == 0 and clean["outliers"] == []
    assert clean["worst_group"]["step_ratio"] < 3 and clean["worst_group"]["mse_ratio"] < 10
    w[7, 130] = value                                       # row 7, group 2 (columns 128-191)
    st = quantize_layer("bad", "wna16_linear", w, W4G64, None).stats
    assert st["outlier_groups"] == 1 and [where(o) for o in st["outliers"]] == [(7, 2)]
    assert where(st["worst_group"]) == (7, 2)
    o = st["outliers"][0]
    assert o["step_ratio"] > 1000 and o["max_abs_err"] > 10 * st["weight_mean_abs_err"]
    assert json.loads(json.dumps(st, allow_nan=False)) == st       # plain JSON numbers


def test_ragged_group_and_all_zero_rows():
    # K = 200 in groups of 64: the last group has 8 columns. All-zero rows keep a placeholder scale, not a step.
    w = random_weight(2, k=200)
    w[:4] = 0
    assert quantize_layer("x", "wna16_linear", w, W4G64, None).stats["outlier_groups"] == 0
    w[9, 197] = -1e4
    st = quantize_layer("x", "wna16_linear", w, W4G64, None).stats
    assert [where(o) for o in st["outliers"]] == [(9, 3)]


def test_gptq_stats_flag_the_outlier_group():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 256, generator=g)
    h = 2 / len(x) * x.T @ x
    w = random_weight(5)
    w[30, 10] = 1e4
    r = gptq_quantize(w, h, W4G64)
    st = group_error_stats(w, dequantize_codes(r.codes, r.scales, r.zeros, 64), r.scales, 64)
    assert [where(o) for o in st["outliers"]] == [(30, 0)]


def test_outlier_lines_capped():
    layers = []
    for i in range(MAX_WARNED_LAYERS + 2):
        w = random_weight(10 + i)
        w[i, 64 * (i % 4)] = 1e4
        layers.append(quantize_layer(f"layer{i}", "wna16_linear", w, W4G64, None))
    layers.append(quantize_layer("clean", "wna16_linear", random_weight(99), W4G64, None))
    lines = outlier_lines(layers)
    assert len(lines) == MAX_WARNED_LAYERS + 1
    assert lines[0].startswith("warning: layer0: 1 outlier weight group (row 0, group 0 = columns 0-63: step ")
    assert lines[-1] == "warning: 2 more layers have outlier weight groups (see report.md)"
    assert outlier_lines(layers[-1:]) == []


def test_report_lists_the_outlier_group(llama_dir, tmp_path):
    clean = lowbit.compile(str(llama_dir), "rtn-w4g64", out=tmp_path / "clean", quiet=True)
    assert "Outlier weight groups" not in (clean / "report.md").read_text()
    corrupt_checkpoint(llama_dir, "model.layers.1.mlp.down_proj.weight", (5, 70), 1e4)
    out = lowbit.compile(str(llama_dir), "rtn-w4g64", out=tmp_path / "bad", quiet=True)
    layers = json.loads((out / "graph.json").read_text())["layers"]
    assert {n: [where(o) for o in l["stats"]["outliers"]] for n, l in layers.items() if l["stats"]["outlier_groups"]} \
        == {"model.layers.1.mlp.down_proj": [(5, 1)]}
    report = (out / "report.md").read_text()
    assert "## Outlier weight groups" in report
    assert "| model.layers.1.mlp.down_proj | 5 | 1 (64-127) |" in report
