"""Artifacts in the checkpoint's own precision: float tensors a bfloat16 / float16 checkpoint holds exactly are
stored in it (program format 3, ``widen``), never silently widened on disk, and computed exactly as before."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.format import program as program_format

from tests.conftest import VOCAB, make_model, make_tokenizer


def _checkpoints(arch: str, root, dtype=torch.bfloat16):
    """The same weights saved in ``dtype`` and, widened, in float32."""
    narrow = make_model(arch).to(dtype)
    wide = make_model(arch)
    wide.load_state_dict({k: v.float() for k, v in narrow.state_dict().items()})
    for name, m in (("narrow", narrow), ("wide", wide)):
        m.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root / "narrow", root / "wide"


@pytest.mark.parametrize("arch,recipe,target", [("llama", "rtn-w4g64", "torch"), ("qwen2", "zq-w8a8", "torch"),
                                                 ("gpt2", "rtn-w4g64", "torch"), ("llama", "rtn-w4g64-sym", "onnx"),
                                                 ("qwen2", "rtn-w4g64", "onnx")])
def test_a_bf16_checkpoint_is_stored_in_bf16_and_computes_the_same(arch, recipe, target, tmp_path):
    narrow, wide = _checkpoints(arch, tmp_path)
    a = lowbit.compile(str(narrow), recipe, out=tmp_path / "a", target=target, quiet=True)
    b = lowbit.compile(str(wide), recipe, out=tmp_path / "b", target=target, quiet=True)
    ta, tb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert ta.keys() == tb.keys()
    doc = json.loads((a / "program.json").read_text())
    assert doc["version"] == program_format.WIDEN_VERSION and doc["widen"]
    assert {k for k, t in ta.items() if t.dtype == torch.bfloat16} == set(doc["widen"])
    assert all(tb[k].dtype == torch.float32 and torch.equal(ta[k].float(), tb[k]) for k in doc["widen"])
    assert json.loads((b / "program.json").read_text())["version"] == 2 and "widen" not in json.loads(
        (b / "program.json").read_text())                    # a float32 checkpoint: the artifact as before
    assert sum(t.numel() * t.element_size() for t in ta.values()) < sum(
        t.numel() * t.element_size() for t in tb.values())
    assert json.loads((a / "manifest.json").read_text())["sizes"]["stored_dtype"] == "bfloat16"
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for backend in (["torch"] if target == "torch" else ["torch", "ort"]):
        ya = torch.as_tensor(lowbit.load(a, backend=backend).forward(ids))
        yb = torch.as_tensor(lowbit.load(b, backend=backend).forward(ids))
        if backend == "ort" and arch == "qwen2":
            # The untied table stays bfloat16 in ONNX and the first norm reads its rows through a Cast, which
            # onnxscript's RMSNorm rule does not match: that norm keeps its plain ops, another float order.
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ya, yb), backend


@pytest.mark.parametrize("arch,narrow", [("qwen2", True), ("llama", False)])   # a separate head; a tied one
def test_the_onnx_model_keeps_a_looked_up_table_narrow(arch, narrow, tmp_path):
    """ONNX: a bfloat16 vocabulary table that only Gather reads stays a bfloat16 initializer (its rows cast to
    float32 after the lookup); one the head's MatMul also reads is float32, as ONNX Runtime's CPU MatMul needs."""
    import onnx

    a = lowbit.compile(str(_checkpoints(arch, tmp_path)[0]), "rtn-w4g64", out=tmp_path / "a", target="onnx",
                       quiet=True)
    model = onnx.load(str(a / "onnx" / "model.onnx"), load_external_data=False)
    tables = {v.name: v.data_type for v in model.graph.initializer if len(v.dims) == 2 and v.dims[0] == VOCAB}
    looked_up = [tables[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert looked_up == [onnx.TensorProto.BFLOAT16 if narrow else onnx.TensorProto.FLOAT]


def test_only_exact_values_are_narrowed():
    """A float32 tensor bfloat16 cannot hold (the rotary frequencies, or any rounding) stays float32: the check can
    fail."""
    g = torch.fx.symbolic_trace(_Add())
    g.exact = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16).float(), requires_grad=False)
    g.inexact = torch.nn.Parameter(torch.randn(8) / 3, requires_grad=False)
    doc, tensors = program_format.encode(g, torch.float32, storage=torch.bfloat16)
    assert doc["widen"] == ["exact"] and tensors["exact"].dtype == torch.bfloat16
    assert tensors["inexact"].dtype == torch.float32
    gm = program_format.decode(doc, tensors)
    assert gm.c0_exact.dtype == torch.float32 and torch.equal(gm.c0_exact, g.exact)


@pytest.mark.parametrize("widen,needle", [("x", "widen must be a list of tensor names"),
                                          ([3], "widen must be a list of tensor names")])
def test_a_malformed_widen_list_is_refused(widen, needle):
    doc, tensors = program_format.encode(torch.fx.symbolic_trace(_Add()), torch.float32)
    doc.update(widen=widen, version=program_format.WIDEN_VERSION)
    with pytest.raises(LowbitError, match=needle):
        program_format.decode(doc, tensors)


class _Add(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.exact = torch.nn.Parameter(torch.ones(8), requires_grad=False)
        self.inexact = torch.nn.Parameter(torch.ones(8), requires_grad=False)

    def forward(self, x):
        return x + self.exact + self.inexact


@pytest.mark.parametrize("arch", ["qwen2", "llama"])          # a separate head, a head tied to the table
def test_the_torch_runtime_keeps_the_vocabulary_table_and_head_narrow(arch, tmp_path):
    """A bfloat16 embedding table that only lookups read stays bfloat16 in the running program (the rows are
    widened after the lookup: same outputs, the test above), and so does a bfloat16 head (``narrow_linear``
    widens it block by block); the float32 artifact's stay float32 (the control)."""
    narrow, wide = _checkpoints(arch, tmp_path)
    read = []
    for src, out in ((narrow, "a"), (wide, "b")):
        gm = lowbit.load(lowbit.compile(str(src), "rtn-w4g64", out=tmp_path / out, quiet=True)).runner.gm
        read.append({(n.target, getattr(gm, n.args[i].target).dtype) for n in gm.graph.nodes for i in (0, 1)
                     if n.target in (torch.ops.aten.embedding.default, torch.ops.aten.linear.default,
                                     torch.ops.lowbit.narrow_linear.default)
                     and isinstance(n.args[i], torch.fx.Node) and n.args[i].op == "get_attr"})
    lookup, linear, narrow_linear = (torch.ops.aten.embedding.default, torch.ops.aten.linear.default,
                                     torch.ops.lowbit.narrow_linear.default)
    assert read[0] == {(lookup, torch.bfloat16), (narrow_linear, torch.bfloat16)}
    assert read[1] == {(lookup, torch.float32), (linear, torch.float32)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_linear_is_the_wide_linear(monkeypatch, dtype):
    """``narrow_linear`` over several row blocks gives float32 ``F.linear`` on the widened weight (to float32
    rounding), not the cheaper product with x rounded to the weight's dtype (the negative control)."""
    from lowbit import ops

    monkeypatch.setattr(ops, "NARROW_BLOCK_BYTES", 64 * 4 * 5)
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 2, 64, generator=g), torch.randn(37, 64, generator=g).to(dtype), torch.randn(37)
    got = torch.ops.lowbit.narrow_linear(x, w, b)
    want = torch.nn.functional.linear(x, w.float(), b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    cheap = torch.nn.functional.linear(x.to(dtype), w, b.to(dtype)).float()
    assert (cheap - want).abs().max() > 1e-3


def _float32_and_rounded(arch: str, root, dtype):
    """A float32 checkpoint whose values ``dtype`` does not hold, and the same model saved in ``dtype``."""
    wide = make_model(arch)
    for name, m in (("f32", wide), ("rounded", make_model(arch).to(dtype))):
        m.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root / "f32", root / "rounded"


def _same_artifact(a, b) -> bool:
    ta, tb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    return ((a / "program.json").read_text() == (b / "program.json").read_text() and ta.keys() == tb.keys()
            and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta))


def _embedding_recipe():
    from lowbit.passes.recipe import Recipe, Scheme

    return Recipe("emb8", "rtn", Scheme(bits=8, group_size=32, quantize_embeddings=True))      # compiled in memory


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w4g64", "emb8"])
def test_dtype_compiles_a_float32_checkpoint_as_if_it_were_saved_in_that_dtype(recipe, text_file, tmp_path):
    """``dtype="bfloat16"`` on a float32 checkpoint gives the artifact of the same model saved in bfloat16, whether
    the compile streams (RTN, GPTQ) or loads the model (a quantized embedding); without it the artifacts differ
    (the control)."""
    from lowbit.compiler.pipeline import CalibrationArgs

    f32, rounded = _float32_and_rounded("llama", tmp_path, torch.bfloat16)
    kw = dict(recipe=_embedding_recipe() if recipe == "emb8" else recipe, quiet=True,
              calib=CalibrationArgs(str(text_file), samples=4, seq_len=32))
    chosen = lowbit.compile(str(f32), out=tmp_path / "chosen", dtype="bfloat16", **kw)
    saved = lowbit.compile(str(rounded), out=tmp_path / "saved", **kw)
    assert _same_artifact(chosen, saved)
    manifest = json.loads((chosen / "manifest.json").read_text())
    assert manifest["source"]["dtype"] == "float32" and manifest["sizes"]["stored_dtype"] == "bfloat16"
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lowbit.load(chosen).forward(ids), lowbit.load(saved).forward(ids))
    if recipe == "rtn-w4g64":
        assert not _same_artifact(lowbit.compile(str(f32), out=tmp_path / "auto", **kw), saved)


def test_dtype_float32_widens_a_bfloat16_checkpoint(tmp_path):
    """``dtype="float32"`` stores a bfloat16 checkpoint's tensors in float32: the artifact of its float32 copy."""
    narrow, wide = _checkpoints("llama", tmp_path)
    a = lowbit.compile(str(narrow), "rtn-w4g64", out=tmp_path / "a", dtype="float32", quiet=True)
    assert _same_artifact(a, lowbit.compile(str(wide), "rtn-w4g64", out=tmp_path / "b", quiet=True))
    assert "widen" not in json.loads((a / "program.json").read_text())


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "emb8"])
def test_a_weight_float16_cannot_hold_is_refused(recipe, tmp_path):
    """A finite weight past float16's range is one error naming it, not an Inf in the artifact; nothing is left."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = 1e5
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(LowbitError, match=r"model weight model\.layers\.0\.mlp\.up_proj\.weight holds 1e\+05, "
                                          r"beyond float16's range; compile with --dtype bfloat16 or float32"):
        lowbit.compile(str(tmp_path / "m"), _embedding_recipe() if recipe == "emb8" else recipe,
                       out=tmp_path / "out", dtype="float16", quiet=True)
    assert not (tmp_path / "out").exists()
