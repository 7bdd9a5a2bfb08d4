"""CPU kernels of wna16_linear (kernels/cpu.py) against the reference kernel, on both of their paths."""

import pytest
import torch

from lowbit.kernels import cpu
from lowbit.ops import wna16_linear_reference
from tests.test_ops import _layer

pytestmark = pytest.mark.skipif(not cpu.int4pack_layout_ok(), reason="this torch lacks the int4pack CPU kernels")

# (bits, group, n, k): groups the kernels take directly, a ragged last group (K=576 in groups of 128), K and N
# that need padding, per channel, and 8-bit per channel (int8pack) and grouped (dequantize only).
FORMATS = [(4, 64, 96, 576), (4, 128, 64, 576), (4, 32, 40, 100), (4, 0, 48, 72), (8, 0, 48, 96), (8, 64, 32, 128)]


def _error(bits, group, n, k, m, seed, residual=True):
    qw, s, z, b, _, g = _layer(n, k, bits, group, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, m, k, generator=gen)
    r = torch.randn(2, m, n, generator=gen) if residual else None
    lin = cpu.CpuQuantLinear(qw, s, z, b, bits, g, k)
    y = lin(x, r)
    small = 2 * m <= cpu.SMALL_M and (bits == 4 or group == 0)
    if small:    # the bfloat16 path: the reference on bfloat16-rounded activations
        x = x.to(torch.bfloat16).float()
    ref = wna16_linear_reference(x, qw, s, z, b, bits, g, k, r)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    return ((y - ref).abs().max() / ref.abs().max()).item(), small, lin, (x, qw, s, z, b, g, r)


@pytest.mark.parametrize("bits,group,n,k", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_cpu_linear_matches_reference(bits, group, n, k, m):
    err, small, *_ = _error(bits, group, n, k, m, seed=bits * 31 + group + k + m)
    # bfloat16 activations, scales and output: ~2^-8 relative; float32 dequantize + GEMM: rounding only.
    assert err < (1.5e-2 if small else 1e-5), err


def test_cpu_linear_tolerance_fails_a_wrong_weight():
    """Negative control: one group's zero off by one moves the output by more than either tolerance allows."""
    for m in (1, 40):
        _, _, lin, (x, qw, s, z, b, g, r) = _error(4, 64, 96, 576, m, seed=7)
        z_bad = z.clone()
        z_bad[:, 3] += 1
        ref_bad = wna16_linear_reference(x, qw, s, z_bad, b, 4, g, 576, r)
        assert ((lin(x, r) - ref_bad).abs().max() / ref_bad.abs().max()).item() > 3e-2


def test_cpu_linear_keeps_input_dtype_and_leading_dims():
    qw, s, z, b, _, g = _layer(64, 128, 4, 64, seed=2)
    lin = cpu.CpuQuantLinear(qw, s, z, b, 4, g, 128)
    for m in (1, 33):
        y = lin(torch.randn(3, m, 128, dtype=torch.bfloat16))
        assert y.shape == (3, m, 64) and y.dtype == torch.bfloat16


def test_cpu_support_names_what_it_cannot_run():
    assert "3-bit" in cpu.cpu_support(3, 64, 576)
    assert "multiple of 32" in cpu.cpu_support(4, 48, 576)
    assert cpu.cpu_support(4, 64, 576) is None and cpu.cpu_support(4, 576, 576) is None
    with pytest.raises(ValueError, match="2-bit"):
        cpu.CpuQuantLinear(*_layer(8, 64, 2, 32, seed=1)[:4], 2, 32, 64)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch,recipe", [("llama", "rtn-w4g64"), ("opt", "rtn-w8"), ("gpt2", "rtn-w4g32"),
                                         ("llama", "rtn-q4_0")])
def test_artifact_on_cpu_kernels_matches_the_reference_kernels(arch, recipe, model_dirs, tmp_path, capfd):
    """Loaded with kernels="auto", every quantized matmul runs a CPU kernel, the packed tensors they replace are
    dropped (a quantized embedding's table, which a tied head shares, stays for the lookup), prefill equals the
    reference kernels' to float rounding and cached one-token steps to bfloat16's."""
    import lowbit

    art = lowbit.compile(str(model_dirs[arch]), recipe, out=tmp_path / "a", quiet=True)
    fast, ref = lowbit.load(art), lowbit.load(art, kernels="reference")
    gm = fast.runner.gm
    n_ops = sum(n.target is torch.ops.lowbit.wna16_linear.default for n in ref.runner.gm.graph.nodes)
    assert fast.runner.kernels == {"cpu": n_ops, "reference": {}} and n_ops > 0
    assert not any(n.target is torch.ops.lowbit.wna16_linear.default for n in gm.graph.nodes)
    kept = [name for name, _ in gm.named_buffers(recurse=False) if name.endswith("qweight")]
    assert kept == [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("qweight")]
    assert all("embed" in name for name in kept) and len(kept) == (recipe == "rtn-q4_0")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 300, (2, 24), generator=g)      # 48 rows: the float32 path
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    assert _rel(fast.forward(ids, mask), ref.forward(ids, mask)) < 1e-5
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    lf, cf = fast.forward(ids, mask, position_ids=pos)
    lr, cr = ref.forward(ids, mask, position_ids=pos)
    nxt = torch.randint(2, 300, (2, 1), generator=g)         # 2 rows: the bfloat16 path
    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    step_f, _ = fast.forward(nxt, mask, cf, pos[:, -1:] + 1)
    step_r, _ = ref.forward(nxt, mask, cr, pos[:, -1:] + 1)
    err = _rel(step_f, step_r)
    assert 0 < err < 3e-2, err
    assert "reference kernel" not in capfd.readouterr().err


def test_formats_without_a_cpu_kernel_keep_the_reference_and_say_so(model_dirs, tmp_path, capfd):
    import lowbit
    from lowbit.errors import LowbitError

    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w3g64", out=tmp_path / "a", quiet=True)
    capfd.readouterr()
    eng = lowbit.load(art)
    assert eng.runner.kernels["cpu"] == 0 and eng.runner.kernels["reference"] == {"no CPU kernel for 3-bit codes": 8}
    assert "8 quantized matmul(s) run the reference kernel on CPU: no CPU kernel for 3-bit codes" in capfd.readouterr().err
    with pytest.raises(LowbitError, match="unknown kernels 'fast'"):
        lowbit.load(art, kernels="fast")


def test_scratch_grown_under_inference_mode_serves_calls_outside_it():
    qw, s, z, b, _, g = _layer(64, 4096, 8, 64, seed=9)       # a tile larger than any before: the buffers grow
    lin = cpu.CpuQuantLinear(qw, s, z, b, 8, g, 4096)
    x = torch.randn(40, 4096)
    with torch.inference_mode():
        inside = lin(x)
    assert torch.equal(lin(x), inside)
