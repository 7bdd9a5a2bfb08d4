"""ZeroQuant: W8A8 / mixed INT4-INT8 recipes, the integer W4A8 kernel, LKD, encoder embedding eval, bad inputs."""

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.format.artifact import read_manifest
from lowbit.frontend.load import load_model
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.passes.lkd import block_loss
from lowbit.format.quantize import QuantSpec, pack_codes, quantize_weight
from lowbit.ops import int8_matmul, quantize_rows_int8, signed_weight

from tests.conftest import sample_text


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("zq") / "calib.txt"
    p.write_text(sample_text(6000, 11))
    return p


def test_w8a8_kernel_is_exact_integer_arithmetic():
    """int8 x int8 products summed in int32 equal exact integer math; the float rescale is within 1e-6."""
    for k, group in [(96, 96), (100, 32), (64, 16)]:
        w0 = torch.randn(20, k, generator=torch.Generator().manual_seed(k))
        q, scales, zeros = quantize_weight(w0, QuantSpec(8, group, True, act_bits=8))
        qweight, eff = pack_codes(q, 8), QuantSpec(8, group).group(k)
        x = torch.randn(7, k) * torch.rand(7, 1) * 10
        xq, sx = quantize_rows_int8(x)
        assert xq.dtype == torch.int8 and int(xq.abs().max()) == 127
        assert float(((xq.float() * sx - x).abs() / sx).max()) <= 0.5 + 1e-4     # round to nearest
        w = signed_weight(qweight, zeros, 8, k, eff)
        y64 = torch.zeros(7, 20, dtype=torch.float64)
        for gi, k0 in enumerate(range(0, k, eff)):
            acc = int8_matmul(xq[:, k0:k0 + eff].contiguous(), w[:, k0:k0 + eff].contiguous())
            exact = xq[:, k0:k0 + eff].long() @ w[:, k0:k0 + eff].long().t()
            assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact)
            y64 += exact.double() * scales[:, gi].double()
        y64 = y64 * sx.double()
        y = torch.ops.lowbit.w8a8_linear(x, qweight, scales, zeros, None, 8, eff, k)
        assert float(((y.double() - y64).abs() / y64.abs().max()).max()) < 1e-6


def test_int8_matmul_exact_at_the_extremes():
    """The torch backend's int32 products do not depend on the CPU: float32 GEMMs over K chunks of 1024 are exact
    for int8 operands at their extremes (runs of one sign), and so is the float64 path taken when float32
    matmuls may run in reduced precision."""
    g = torch.Generator().manual_seed(3)
    for m, k in ((1, 96), (5, 1024), (3, 3000)):
        a = torch.full((m, k), 127, dtype=torch.int8)
        a[m // 2] = -127
        b = (torch.randint(0, 2, (24, -(-k // 4)), generator=g) * 255 - 128).repeat_interleave(4, 1)[:, :k]
        b = b.clamp(-128, 127).to(torch.int8)                                    # [N, K]: -128 and 127 in runs
        exact = a.long() @ b.long().t()
        got = int8_matmul(a, b)
        assert got.dtype == torch.int32 and torch.equal(got.long(), exact)
    # Negative control: a reduced-precision product (what float32 matmuls below "highest" may use) is caught.
    assert not torch.equal((a.bfloat16() @ b.bfloat16().t()).double(), exact.double())
    torch.set_float32_matmul_precision("medium")
    try:                                                  # reduced-precision float32 matmuls: float64 instead
        assert torch.equal(int8_matmul(a, b).long(), exact)
    finally:
        torch.set_float32_matmul_precision("highest")


def test_w4a8_kernel_is_exact_integer_arithmetic():
    """4-bit symmetric weights widen to int8 in [-8, 7] (each group's largest magnitude at -8); the products are
    exact int32 sums per group."""
    k, n, group = 96, 16, 32
    w = torch.randn(n, k)
    q, s, z = quantize_weight(w, QuantSpec(4, group, True, act_bits=8))
    qweight = pack_codes(q, 4)
    sw = signed_weight(qweight, z, 4, k, group)
    assert sw.dtype == torch.int8 and int(sw.min()) == -8 and int(sw.max()) <= 7
    x = torch.randn(5, k)
    xq, sx = quantize_rows_int8(x)
    y64 = torch.zeros(5, n, dtype=torch.float64)
    for g, k0 in enumerate(range(0, k, group)):
        acc = int8_matmul(xq[:, k0:k0 + group].contiguous(), sw[:, k0:k0 + group].contiguous())
        assert torch.equal(acc.long(), xq[:, k0:k0 + group].long() @ sw[:, k0:k0 + group].long().t())
        y64 += acc.double() * s[:, g].double()
    y = torch.ops.lowbit.w8a8_linear(x, qweight, s, z, None, 4, group, k)
    assert float((y.double() - y64 * sx.double()).abs().max() / y64.abs().max()) < 1e-6


@pytest.mark.parametrize("arch,attn,mlp", [("llama", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"),
                                           ("gpt2", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"),
                                           ("opt", "model.decoder.layers.0.self_attn.k_proj",
                                            "model.decoder.layers.0.fc1"),
                                           ("bert", "encoder.layer.0.attention.output.dense",
                                            "encoder.layer.0.intermediate.dense")])
def test_mixed_recipes_put_int8_on_attention_int4_on_mlp(arch, attn, mlp, model_dirs, tmp_path):
    for recipe, op in (("zq-w4a16-mixed", "wna16_linear"), ("zq-w4a8-mixed", "w8a8_linear")):
        art = lowbit.compile(str(model_dirs[arch]), recipe, out=tmp_path / recipe, quiet=True)
        layers = json.loads((art / "graph.json").read_text())["layers"]
        assert layers[attn]["bits"] == 8 and layers[mlp]["bits"] == 4
        assert all(v["sym"] and v["op"] == op for v in layers.values())
        assert "lm_head" not in layers


def _logit_err(art, loaded, ids):
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    return float((lowbit.load(art).forward(ids) - ref).norm() / ref.norm())


def test_lkd_reduces_block_error_and_model_error(model_dirs, calib_file, tmp_path):
    calib = CalibrationArgs(str(calib_file))
    plain = lowbit.compile(str(model_dirs["llama"]), "zq-w4a8-mixed", out=tmp_path / "p", quiet=True)
    lkd = lowbit.compile(str(model_dirs["llama"]), "zq-w4a8-mixed-lkd", out=tmp_path / "l", quiet=True, calib=calib,
                         lkd={"steps": 40, "lr": 1e-4, "samples": 8, "seq_len": 64})
    info = read_manifest(lkd)["lkd"]
    assert info["options"]["data"] == "calib" and len(info["blocks"]) == 2
    assert all(b["kept"] and b["loss_after"] < 0.9 * b["loss_before"] for b in info["blocks"].values())
    assert "## LKD" in (lkd / "report.md").read_text()
    loaded = load_model(str(model_dirs["llama"]))
    ids = loaded.tokenizer(sample_text(400, 5), return_tensors="pt")["input_ids"][:, :64]
    assert _logit_err(lkd, loaded, ids) < _logit_err(plain, loaded, ids)
    # Without text: random token sequences; an encoder distils the same way.
    # ... and the student fed the float model's block inputs instead of its own chain's, with the plain MSE.
    rnd = lowbit.compile(str(model_dirs["bert"]), "zq-w4a8-mixed-lkd", out=tmp_path / "b", quiet=True,
                         lkd={"steps": 10, "data": "random", "samples": 4, "seq_len": 32, "inputs": "float",
                              "loss": "token"})
    opts = read_manifest(rnd)["lkd"]["options"]
    assert (opts["data"], opts["inputs"], opts["loss"]) == ("random", "float", "token")


def test_lkd_token_loss_ignores_each_tokens_scale():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(2, 5, 16, generator=gen)
    err = 0.1 * torch.randn(2, 5, 16, generator=gen)
    big = torch.ones(2, 5, 1)
    big[:, 0] = 100.0                       # an attention-sink token 100x the others
    plain, scaled = block_loss(t + err, t, "token"), block_loss((t + err) * big, t * big, "token")
    assert torch.allclose(plain, scaled, rtol=1e-5)
    assert float(block_loss(t + err, t, "mse")) == pytest.approx(float((err ** 2).mean()), rel=1e-5)
    # Under plain MSE the sink token's error is 10^4 times the others' and swamps them.
    assert block_loss((t + err) * big, t * big, "mse") > 1000 * block_loss(t + err, t, "mse")


def test_encoder_embedding_cosine(model_dirs, text_file, tmp_path, capsys):
    art = lowbit.compile(str(model_dirs["bert"]), "zq-w8a8", out=tmp_path / "b", quiet=True)
    code, out, _ = _cli(capsys, "eval", art, "--embeddings", text_file, "--max-sentences", "40", "--json", "-q")
    res = json.loads(out)
    assert code == 0 and res["sentences"] == 40 and 0.99 < res["cosine_mean"] <= 1.0 + 1e-6
    assert res["cosine_min"] <= res["cosine_mean"]


def test_bad_inputs(model_dirs, text_file, tmp_path, capsys):
    def fails(*args, match):
        code, _, err = _cli(capsys, *args)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()

    llama, bert = model_dirs["llama"], model_dirs["bert"]
    fp_lkd = tmp_path / "fp.toml"
    fp_lkd.write_text('method = "fp"\nlkd = true\n')
    fails("compile", llama, "-r", fp_lkd, "-o", tmp_path / "x", "-q", match="LKD needs quantized weights")
    fails("compile", llama, "-r", "zq-w4a8-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-steps", "0",
          match="lkd_steps=0 (--lkd-steps): must be >= 1")
    fails("compile", llama, "-r", "zq-w4a8-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-data", "web",
          match="lkd_data='web' (--lkd-data)")
    fails("compile", llama, "-r", "zq-w4a8-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-inputs", "teacher",
          match="lkd_inputs='teacher' (--lkd-inputs)")
    fails("compile", llama, "-r", "zq-w4a8-mixed-lkd", "-o", tmp_path / "x", "-q", "--lkd-loss", "l1",
          match="lkd_loss='l1' (--lkd-loss)")
    fails("compile", llama, "-r", "zq-w4a8-mixed", "-o", tmp_path / "x", "-q", "--lkd-steps", "5",
          match="does not distil")
    asym = tmp_path / "asym.toml"
    asym.write_text('bits = 8\nsym = false\nact_bits = 8\n')
    fails("compile", llama, "-r", asym, "-o", tmp_path / "x", "-q", match="symmetric")
    # An encoder where only a causal LM makes sense, and the other way round.
    fails("compile", bert, "-r", "zq-w8a8", "-o", tmp_path / "x", "-q", "--eval", text_file, match="causal LM")
    enc = lowbit.compile(str(bert), "zq-w8a8", out=tmp_path / "enc", quiet=True)
    fails("eval", enc, "--text", text_file, "-q", match="--embeddings")
    fails("run", enc, "-p", "hello", match="causal LM")
    dec = lowbit.compile(str(llama), "zq-w8a8", out=tmp_path / "dec", quiet=True)
    fails("eval", dec, "--embeddings", text_file, "-q", match="needs an encoder")
