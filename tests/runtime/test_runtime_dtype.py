"""The torch runtime in a dtype narrower than the trace's (float16, bfloat16: CUDA's default, or ``dtype=``): the
program's casts to float32 stay float32 where the model upcasts for precision, so the logits are the float32
run's to the narrow dtype's rounding, also where the residual stream squares past float16's range."""

import pytest
import torch

import lowbit
from lowbit.format import program as program_format

from tests.conftest import ARCHS, MORE_CAUSAL

TOL = {"float16": 1e-2, "bfloat16": 6e-2}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("arch", [*ARCHS, *MORE_CAUSAL])
def test_narrow_runtime_dtypes_give_the_float32_logits(arch, model_dirs, more_model_dirs, tmp_path):
    folder = model_dirs[arch] if arch in model_dirs else more_model_dirs[arch]
    art = lowbit.compile(str(folder), "rtn-w8", out=tmp_path / "a", quiet=True)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = lowbit.load(art, kernels="reference").forward(ids)
    for dtype, tol in TOL.items():
        got = lowbit.load(art, kernels="reference", dtype=dtype).forward(ids)
        assert _rel(got, ref) < tol, (dtype, _rel(got, ref))
    if arch != "bert":              # the cached step path too, in float16
        eng = lowbit.load(art, kernels="reference", dtype="float16")
        out = eng.generate_ids(ids[:1], torch.ones_like(ids[:1]), max_new_tokens=4)
        assert out.shape[-1] >= ids.shape[1] + 1


def test_float16_keeps_the_norms_upcast_past_its_range(tokenizer, tmp_path, monkeypatch):
    """A residual stream of a few hundred (real models' outlier channels): its square overflows float16, so the
    RMSNorm's variance must be computed in float32, as the model asked. The control: every cast to float32 made a
    cast to float16 (what a float32 trace says) loses the logits."""
    from tests.conftest import make_model

    model = make_model("llama", seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 150.0)
    folder = tmp_path / "big"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    art = lowbit.compile(str(folder), "rtn-w8", out=tmp_path / "a", quiet=True)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = lowbit.load(art, kernels="reference").forward(ids)
    assert _rel(lowbit.load(art, kernels="reference", dtype="float16").forward(ids), ref) < TOL["float16"]
    monkeypatch.setattr(program_format, "keep_upcasts", lambda casts, traced: set())
    plain = lowbit.load(art, kernels="reference", dtype="float16").forward(ids)
    assert not torch.isfinite(plain).all() or _rel(plain, ref) > 0.1


def test_bfloat16_keeps_rotary_angles_past_256_positions(tokenizer, tmp_path, monkeypatch):
    """bfloat16 holds integers exactly only to 256: the position ids and frequencies stay float32 as transformers
    computes them, so a long sequence's last tokens keep the float32 logits to bfloat16's rounding of sharp
    attention (0.07 here). The control maps them too (0.88 here)."""
    import transformers as tf

    from tests.conftest import make_config

    config = make_config("llama")
    config.max_position_embeddings = 1024
    torch.manual_seed(5)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():                        # sharp attention: the scores depend on the angles
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    folder = tmp_path / "long"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    art = lowbit.compile(str(folder), "fp", out=tmp_path / "a", quiet=True)
    ids = torch.randint(3, 300, (1, 700), generator=torch.Generator().manual_seed(6))
    ref = lowbit.load(art, kernels="reference").forward(ids)[:, 600:]
    kept = _rel(lowbit.load(art, kernels="reference", dtype="bfloat16").forward(ids)[:, 600:], ref)
    monkeypatch.setattr(program_format, "keep_upcasts", lambda casts, traced: set())
    plain = _rel(lowbit.load(art, kernels="reference", dtype="bfloat16").forward(ids)[:, 600:], ref)
    assert kept < 0.1 and plain > 3 * kept
