"""lowbit's own ONNX emitter (compiler/fx_onnx.py): each op against torch on fresh random inputs, whole programs
against torch.onnx's export of the same program, the fallback to torch.onnx, and the refusals."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.lowering.onnx import fx_onnx
from lowbit.lowering.onnx.fx_onnx import Unsupported, dim_name, to_onnx
from lowbit.tools.inspect_artifact import describe

aten = torch.ops.aten


def _emit_and_run(fn, shapes_per_run: list[list[tuple]], dims: list[dict], dtypes=None, tmp_path=None,
                  seed: int = 0):
    """Trace ``fn`` (aten calls) with torch.fx, emit it with example runs of the given shapes, then run the ONNX
    model in ONNX Runtime on fresh random inputs of the last run's shapes; (onnx outputs, torch outputs)."""
    import onnx_ir as ir

    gm = torch.fx.symbolic_trace(fn)
    dtypes = dtypes or [torch.float32] * len(shapes_per_run[0])
    g = torch.Generator().manual_seed(seed)

    def make(shapes):
        return tuple(torch.randn(s, generator=g).to(d) if d.is_floating_point else
                     torch.randint(0, 3, s, generator=g).to(d) for s, d in zip(shapes, dtypes))

    runs = [make(s) for s in shapes_per_run[:3]]
    names = [f"in{i}" for i in range(len(dims))]
    expected = fn(*[a.clone() for a in runs[-1]])
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    model = to_onnx(gm, runs, names, dims, [f"out{i}" for i in range(len(expected))], 18)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, runs[-1])})
    return got, [e.numpy() for e in expected]


def _close(got, want, rel=1e-6):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        scale = max(float(np.abs(w.astype(np.float64)).max()), 1e-6) if w.size else 1.0
        assert float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max(initial=0.0)) <= rel * scale


BATCH = [{0: "batch"}]
# (name, function, shapes of each example run (3 runs, the last one is checked), dynamic dims per input, dtypes)
OPS = [
    ("binary_and_scalars", lambda x, y: aten.sub.Tensor(aten.mul.Tensor(x, 3.0), aten.div.Tensor(y, 2)),
     [[(2, 5), (2, 5)], [(3, 5), (3, 5)], [(4, 5), (4, 5)]], [{0: "b"}, {0: "b"}], None),
    ("floor_div_where_scalar", lambda x: aten.where.ScalarOther(aten.gt.Scalar(x, 0.0),
                                                                aten.div.Tensor_mode(x, 0.3, rounding_mode="floor"),
                                                                -7.0),
     [[(2, 6)], [(3, 6)], [(5, 6)]], BATCH, None),
    ("gelu_erf_and_tanh", lambda x: (aten.gelu.default(x), aten.gelu.default(x, approximate="tanh")),
     [[(2, 8)], [(3, 8)], [(4, 8)]], BATCH, None),
    ("rsqrt_mean_pow", lambda x: aten.mul.Tensor(x, aten.rsqrt.default(
        aten.add.Tensor(aten.mean.dim(aten.pow.Tensor_Scalar(x, 2), [-1], True), 1e-5))),
     [[(2, 3, 16)], [(3, 5, 16)], [(4, 7, 16)]], [{0: "b", 1: "s"}], None),
    ("views", lambda x: aten.flatten.using_ints(aten.transpose.int(aten.unsqueeze.default(
        aten.view.default(x, [aten.sym_size.int(x, 0), 4, 3]), 1), 2, 3), 1),
     [[(2, 12)], [(3, 12)], [(5, 12)]], BATCH, None),
    ("slice_select_negative", lambda x: (aten.slice.Tensor(x, -1, 2, -1), aten.select.int(x, 1, -2)),
     [[(2, 4, 9)], [(3, 4, 9)], [(5, 4, 9)]], BATCH, None),
    ("expand_stack_cat", lambda x: aten.cat.default([aten.stack.default([x, aten.neg.default(x)], -1),
                                                     aten.expand.default(aten.unsqueeze.default(x, -1), [-1, -1, 2])],
                                                    1),
     [[(2, 3)], [(3, 3)], [(4, 3)]], BATCH, None),
    ("chunk_split", lambda x: (lambda c, s: (c[0], c[1], c[2], s[0], s[2]))(aten.chunk.default(x, 3, 1),
                                                                          aten.split.Tensor(x, 4, 1)),
     [[(2, 10)], [(3, 10)], [(4, 10)]], BATCH, None),
    ("repeat_interleave", lambda x: aten.repeat_interleave.self_int(x, 3, 1),
     [[(2, 2, 5, 4)], [(3, 2, 7, 4)], [(4, 2, 6, 4)]], [{0: "b", 2: "s"}], None),
    ("index_broadcast", lambda x, i, j: aten.index.Tensor(x, [aten.unsqueeze.default(i, 1), j]),
     [[(4, 6), (2,), (3,)], [(5, 6), (4,), (2,)], [(6, 6), (3,), (5,)]], [{0: "r"}, {0: "i"}, {0: "j"}],
     [torch.float32, torch.int64, torch.int64]),
    ("gather_index_select_embedding", lambda w, i: (aten.embedding.default(w, i), aten.index_select.default(w, 1, aten.select.int(i, 0, 0)),
                                                    aten.gather.default(w, 1, aten.slice.Tensor(i, 0, 0, 1))),
     [[(5, 4), (1, 3)], [(5, 4), (1, 3)], [(5, 4), (1, 3)]], [{}, {}], [torch.float32, torch.int64]),
    ("arange_cumsum_tril", lambda x: (aten.arange.start_step(1, aten.sym_size.int(x, 0), 2, dtype=torch.float32),
                                      aten.cumsum.default(x, 1), aten.tril.default(x, -1), aten.triu.default(x, 1)),
     [[(4, 4)], [(5, 4)], [(7, 4)]], BATCH, None),
    ("masked_fill_softmax_layer_norm", lambda x, m: aten.layer_norm.default(
        aten.softmax.int(aten.masked_fill.Scalar(x, m, -3.0), -1), [6], None, None, 1e-5),
     [[(2, 6), (2, 6)], [(3, 6), (3, 6)], [(4, 6), (4, 6)]], [{0: "b"}, {0: "b"}], [torch.float32, torch.bool]),
    ("sdpa_bool_mask_broadcast_kv", lambda q, k, v, m: aten.scaled_dot_product_attention.default(q, k, v, m),
     [[(2, 4, 3, 8), (2, 1, 5, 8), (2, 1, 5, 8), (2, 1, 3, 5)], [(3, 4, 2, 8), (3, 1, 6, 8), (3, 1, 6, 8), (3, 1, 2, 6)],
      [(2, 4, 4, 8), (2, 1, 7, 8), (2, 1, 7, 8), (2, 1, 4, 7)]],
     [{0: "b", 2: "s"}, {0: "b", 2: "t"}, {0: "b", 2: "t"}, {0: "b", 2: "s", 3: "t"}],
     [torch.float32, torch.float32, torch.float32, torch.bool]),
    ("sdpa_gqa_float_mask", lambda q, k, v, m: aten.scaled_dot_product_attention.default(
        q, k, v, m, scale=0.3, enable_gqa=True),
     [[(2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8), (2, 1, 3, 5)], [(3, 4, 2, 8), (3, 2, 6, 8), (3, 2, 6, 8), (3, 1, 2, 6)],
      [(2, 4, 4, 8), (2, 2, 7, 8), (2, 2, 7, 8), (2, 1, 4, 7)]],
     [{0: "b", 2: "s"}, {0: "b", 2: "t"}, {0: "b", 2: "t"}, {0: "b", 2: "s", 3: "t"}], None),
    ("in_place_add_on_a_fresh_tensor", lambda x: aten.add_.Tensor(aten.mul.Tensor(x, 2.0), 1.0),
     [[(2, 3)], [(3, 3)], [(4, 3)]], BATCH, None),
]


@pytest.mark.parametrize("name,fn,shapes,dims,dtypes", OPS, ids=[o[0] for o in OPS])
def test_op_matches_torch(name, fn, shapes, dims, dtypes, tmp_path):
    got, want = _emit_and_run(fn, shapes, dims, dtypes, tmp_path)
    _close(got, want)


def test_op_check_can_fail(tmp_path, monkeypatch):
    """Negative control: a wrong translation (Sub written as Add) fails the same comparison."""
    monkeypatch.setitem(fx_onnx.HANDLERS, aten.sub.Tensor, fx_onnx._binary("Add"))
    name, fn, shapes, dims, dtypes = OPS[0]
    got, want = _emit_and_run(fn, shapes, dims, dtypes, tmp_path)
    with pytest.raises(AssertionError):
        _close(got, want)


def test_refusals(tmp_path):
    # In place on a view would change the viewed tensor too: refused, not silently wrong.
    with pytest.raises(Unsupported, match="share memory"):
        _emit_and_run(lambda x: aten.add_.Tensor(aten.view.default(x, [-1]), 1.0), [[(2, 3)]] * 3, [{}], None,
                      tmp_path)
    with pytest.raises(Unsupported, match="op"):
        _emit_and_run(lambda x: aten.sort.default(x)[0], [[(2, 3)]] * 3, [{}], None, tmp_path)


def test_dynamic_dims_are_named_by_their_sizes():
    assert dim_name([4, 4, 4]) == 4 and dim_name([2, 3, 5]) == "2_3_5"


def _ort_outputs(art, ids, mask):
    eng = lowbit.load(art, backend="ort")
    if eng.task != "causal-lm":
        return [eng.forward(ids, mask)]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits, cache = eng.forward(ids, mask, position_ids=pos)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    step, _ = eng.forward(nxt, mask, cache, pos[:, -1:] + 1)
    return [logits, step]


# The families whose programs hold the emitter's less common ops: ALiBi and baddbmm (BLOOM), SDPA with one K / V
# head and in-place adds (Falcon), stack / flatten / repeat_interleave (GPT-J), chunk (GPT-NeoX), an encoder with
# erf GELU (BERT), tanh GELU (GPT-2), W8A8 and GroupQueryAttention (Llama).
PROGRAMS = [("llama", "zq-w8a8"), ("gpt2", "fp"), ("bert", "rtn-w4g64"), ("bloom", "rtn-w4g64"),
            ("falcon", "fp"), ("gptj", "rtn-w4g64"), ("gpt_neox", "rtn-w4g64")]


@pytest.mark.slow
@pytest.mark.parametrize("arch,recipe", PROGRAMS)
def test_program_matches_torch_onnx_export(arch, recipe, model_dirs, more_model_dirs, tmp_path):
    """The whole program through lowbit's emitter and through torch.onnx: same outputs in ONNX Runtime, same fused
    operators; the emitter did not fall back."""
    folder = model_dirs[arch] if arch in model_dirs else more_model_dirs[arch]
    art = lowbit.compile(str(folder), recipe, out=tmp_path / "a", target="onnx", quiet=True)
    ours = json.loads((art / "manifest.json").read_text())["onnx"]
    assert ours["exporter"] == "lowbit" and "exporter_note" not in ours and "written by lowbit" in describe(art)
    ref = lowbit.compile(str(folder), recipe, out=tmp_path / "ref", target="onnx", quiet=True,
                         onnx_exporter="torch.onnx")
    theirs = json.loads((ref / "manifest.json").read_text())["onnx"]
    assert theirs["exporter"] == "torch.onnx" and ours["fusions"] == theirs["fusions"]
    ids = torch.randint(2, 320, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for a, b in zip(_ort_outputs(art, ids, mask), _ort_outputs(ref, ids, mask)):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_unknown_op_falls_back_to_torch_onnx(model_dirs, tmp_path, monkeypatch):
    monkeypatch.delitem(fx_onnx.HANDLERS, aten.mul.Tensor)
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", target="onnx", quiet=True)
    onnx_info = json.loads((art / "manifest.json").read_text())["onnx"]
    assert onnx_info["exporter"] == "torch.onnx" and "mul" in onnx_info["exporter_note"]
    assert onnx_info["fusions"]["GroupQueryAttention"] == 2
    assert "written by torch.onnx" in describe(art) and "mul" in describe(art)
    ids = torch.randint(2, 320, (2, 6), generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(lowbit.load(art, backend="ort").forward(ids, torch.ones_like(ids))).all()


def test_bad_exporter_name(model_dirs, tmp_path):
    with pytest.raises(lowbit.LowbitError, match="--onnx-exporter torchscript: valid lowbit, torch.onnx"):
        lowbit.compile(str(model_dirs["llama"]), "fp", out=tmp_path / "a", target="onnx", quiet=True,
                       onnx_exporter="torchscript")
    assert not (tmp_path / "a").exists()
