"""Artifacts in the checkpoint's own precision: float tensors a bfloat16 / float16 checkpoint holds exactly are
stored in it (program format 3, ``widen``), never silently widened on disk, and computed exactly as before."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.format import program as program_format

from tests.conftest import make_model, make_tokenizer


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
                                                 ("gpt2", "rtn-w4g64", "torch"), ("llama", "rtn-w4g64-sym", "onnx")])
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
    assert json.loads((a / "manifest.json").read_text())["sizes"]["source_dtype"] == "bfloat16"
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for backend in (["torch"] if target == "torch" else ["torch", "ort"]):
        assert torch.equal(torch.as_tensor(lowbit.load(a, backend=backend).forward(ids)),
                           torch.as_tensor(lowbit.load(b, backend=backend).forward(ids))), backend


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


def test_the_torch_runtime_keeps_the_vocabulary_table_narrow(tmp_path):
    """A bfloat16 embedding table that only lookups read stays bfloat16 in the running program (the rows are
    widened after the lookup: same outputs, the test above); the float32 artifact's stays float32 (the control)."""
    narrow, wide = _checkpoints("qwen2", tmp_path)
    tables = []
    for src, out in ((narrow, "a"), (wide, "b")):
        gm = lowbit.load(lowbit.compile(str(src), "rtn-w4g64", out=tmp_path / out, quiet=True)).runner.gm
        tables.append({n.args[0].target: getattr(gm, n.args[0].target).dtype for n in gm.graph.nodes
                       if n.target is torch.ops.aten.embedding.default})
    assert list(tables[0].values()) == [torch.bfloat16] and list(tables[1].values()) == [torch.float32]
