"""Learnt rounding (AutoRound-style LKD, ``lkd_learn = "rounding"``): the differentiable grid equals the stored
one, the student starts at RTN and stores exactly the codes it learnt, sign-gradient steps stay in range, and a
compile beats RTN on the same model."""

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.format.artifact import read_manifest
from lowbit.format.quantize import (QuantSpec, dequantize_codes, pack_codes, qparams_from_range, quantize_weight,
                                    unpack_codes)
from lowbit.frontend.load import load_model
from lowbit.passes.lkd import RoundingLinear, SignSGD
from lowbit.passes.rtn import quantize_layer

from tests.conftest import sample_text

SPECS = [QuantSpec(3, 64), QuantSpec(4, 32), QuantSpec(4, 64, sym=True), QuantSpec(8, 0, sym=True), QuantSpec(2, 64)]


def _weight(n=24, k=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    w[0, :64] = w[0, :64].abs() + 0.1         # a group with no negative weight: the zero point sits at its edge
    return w


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_differentiable_grid_equals_the_stored_one(spec):
    gen = torch.Generator().manual_seed(spec.bits)
    wmin = -torch.rand(30, 4, generator=gen)
    wmax = torch.rand(30, 4, generator=gen)
    wmin[0] = 0.2 * wmax[0]                  # all-positive groups
    scale, zero = qparams_from_range(wmin, wmax, spec)
    lo, hi = wmin.clone().requires_grad_(True), wmax.clone().requires_grad_(True)
    s, z = qparams_from_range(lo, hi, spec, ste=True)
    assert torch.equal(s, scale.float()) and torch.equal(z, zero.float())
    (s.sum() + z.sum()).backward()
    assert hi.grad.abs().sum() > 0           # the clip range learns through the grid


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_student_starts_at_rtn_and_stores_what_it_learnt(spec):
    w, bias = _weight(seed=spec.bits), torch.randn(24)
    m = RoundingLinear(w, bias, spec)
    q, scale, zero = quantize_weight(w, spec)
    group = spec.group(w.shape[1])
    assert torch.equal(m.dequantized(), dequantize_codes(q, scale, zero, group))       # V = 0, full range: RTN
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.v.copy_(torch.rand(w.shape, generator=gen) - 0.5)
        m.alpha.uniform_(0.5, 1.0, generator=gen)
        m.beta.uniform_(0.5, 1.0, generator=gen)
    learnt = m.dequantized()
    s, z, codes = m.freeze()
    # The reference: the format's own grid on the clipped range, each weight rounded after its offset.
    ref_s, ref_z = qparams_from_range(m.beta.detach() * m.wmin, m.alpha.detach() * m.wmax, spec)
    se = ref_s.float().repeat_interleave(group, 1)[:, :w.shape[1]]
    ze = ref_z.float().repeat_interleave(group, 1)[:, :w.shape[1]]
    ref = torch.clamp(torch.round(w / se + m.v.detach()) + ze, 0, spec.maxq).to(torch.uint8)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z) and torch.equal(codes, ref)
    assert not torch.equal(codes, q)                         # control: the offsets changed the codes
    assert torch.equal(m.dequantized(), learnt)              # the frozen forward is the one trained
    x = torch.randn(5, w.shape[1])
    assert torch.allclose(m(x), x @ dequantize_codes(codes, s, z, group).T + bias, atol=1e-5)
    # The weight pass stores the learnt codes whatever the weight's storage dtype rounds them to.
    layer = quantize_layer("l", "wna16_linear", dequantize_codes(codes, s, z, group).bfloat16(), spec, bias,
                           qparams=(s, z, codes))
    assert torch.equal(unpack_codes(layer.qweight, spec.bits, w.shape[1]), codes)
    assert torch.equal(layer.qweight, pack_codes(codes, spec.bits))


def test_sign_sgd_steps_decay_and_stay_in_range():
    m = RoundingLinear(_weight(), None, QuantSpec(4, 64))
    opt = SignSGD([m], lr=0.4, steps=4)
    v0 = m.v.detach().clone()
    for i in range(4):
        opt.zero_grad()
        m.v.grad = torch.ones_like(m.v)
        m.alpha.grad = -torch.ones_like(m.alpha)
        m.beta.grad = torch.ones_like(m.beta)
        opt.step()
        if i == 0:
            assert torch.allclose(m.v, v0 - 0.4)             # lr * sign(grad)
    # 0.4 + 0.3 + 0.2 + 0.1 = 1.0 down, clamped at -1/2; alpha clamped at 1, beta at 1/2.
    assert torch.all(m.v == -0.5) and torch.all(m.alpha == 1.0) and torch.all(m.beta == 0.5)


def _logit_err(art, model, ids):
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    return float((lowbit.load(art).forward(ids) - ref).norm() / ref.norm())


def test_learnt_rounding_beats_rtn(model_dirs, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(4000, 5))
    recipe = tmp_path / "ar.toml"
    recipe.write_text('method = "rtn"\nbits = 3\ngroup_size = 32\nlkd = true\nlkd_learn = "rounding"\n'
                      'lkd_steps = 40\nlkd_lr = 0.025\nlkd_samples = 8\nlkd_seq_len = 64\n')
    llama = str(model_dirs["llama"])
    art = lowbit.compile(llama, str(recipe), out=tmp_path / "ar", quiet=True, calib=CalibrationArgs(str(calib)))
    rtn = tmp_path / "rtn.toml"
    rtn.write_text('method = "rtn"\nbits = 3\ngroup_size = 32\n')
    plain = lowbit.compile(llama, str(rtn), out=tmp_path / "rtn", quiet=True)
    info = read_manifest(art)["lkd"]
    assert info["options"]["learn"] == "rounding"
    assert "40 sign-gradient steps on the rounding per block" in (art / "report.md").read_text()
    assert all(b["kept"] and b["loss_after"] < 0.9 * b["loss_before"] for b in info["blocks"].values())
    loaded = load_model(llama)
    ids = loaded.tokenizer(sample_text(400, 9), return_tensors="pt")["input_ids"][:, :64]     # text not calibrated on
    assert _logit_err(art, loaded.model, ids) < 0.8 * _logit_err(plain, loaded.model, ids)
    # Compiled in memory (--eval holds the float model), where the one above streamed: the same codes.
    mem = lowbit.compile(llama, str(recipe), out=tmp_path / "mem", quiet=True, calib=CalibrationArgs(str(calib)),
                         eval_text=str(calib), eval_windows=1, eval_seq_len=32)
    assert torch.equal(lowbit.load(mem).forward(ids), lowbit.load(art).forward(ids))
    # The ONNX target carries them too.
    onnx = lowbit.compile(llama, str(recipe), target="onnx", out=tmp_path / "onnx", quiet=True,
                          calib=CalibrationArgs(str(calib)))
    ort_logits = torch.as_tensor(lowbit.load(onnx, backend="ort").forward(ids)).float()
    torch_logits = lowbit.load(art).forward(ids).float()
    assert float((ort_logits - torch_logits).abs().max() / torch_logits.abs().max()) < 1e-3


def test_refusals(model_dirs, tmp_path, capsys):
    def fails(*args, match):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()

    llama = model_dirs["llama"]
    gptq = tmp_path / "gptq.toml"
    gptq.write_text('method = "gptq"\nbits = 3\nlkd = true\nlkd_learn = "rounding"\n')
    fails("compile", llama, "-r", gptq, "-o", tmp_path / "x", "-q", match='use method = "rtn" and mse = false')
    fails("compile", llama, "-r", "zq-w4a16-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-learn", "rounding",
          match='use method = "rtn" and mse = false')
    fails("compile", llama, "-r", "zq-w4a16-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-learn", "codes",
          match="lkd_learn='codes' (--lkd-learn): valid: weights, rounding")


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma3_text"])
def test_learnt_rounding_on_other_families(arch, model_dirs, more_model_dirs, tmp_path):
    """GPT-2's Conv1D weights ([K, N]), OPT's biases and LayerNorms, Gemma-3's sliding-window blocks: each block's
    learnt codes lower its loss, and the artifact runs."""
    folder = {**model_dirs, **more_model_dirs}[arch]
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(3000, 6))
    art = lowbit.compile(str(folder), "ar-w4g64", out=tmp_path / arch, quiet=True, calib=CalibrationArgs(str(calib)),
                         lkd={"steps": 15, "samples": 4, "seq_len": 32})
    blocks = read_manifest(art)["lkd"]["blocks"].values()
    assert all(b["kept"] and b["loss_after"] < b["loss_before"] for b in blocks)
    ids = torch.randint(2, 200, (1, 16), generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(lowbit.load(art).forward(ids)).all()
