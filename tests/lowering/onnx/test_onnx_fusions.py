"""ONNX Runtime's fused operators (compiler/onnx_fusions.py, compiler/ort_attention.py): which fire on which
family, and the fused graph computes what the plain one does."""

import json
import shutil

import numpy as np
import pytest
import torch

import lowbit
from lowbit.format.artifact import MANIFEST, read_manifest, sha256_file
from lowbit.tools.inspect_artifact import describe

# arch -> the fusions that fire in a 2-block tiny model (rtn-w4g64): GroupQueryAttention per layer (rotary Llama),
# a skip norm per residual Add feeding a norm (Llama and GPT-2: every one, the last block's output meeting the
# final norm included; BERT's post-norm blocks: both Adds of each block), the erf GELU formula (BERT), the tanh
# GELU as GPT-2 exports it (our rule, ort_gelu.py). OPT's Adds
# keep their plain ops but the last: OPT flattens the hidden states to [tokens, hidden] around its MLP, so a
# Reshape stands between the Add and the LayerNorm.
EXPECTED = {
    "llama": {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4},
    "opt": {"SkipLayerNormalization": 1},
    "gpt2": {"FastGelu": 2, "SkipLayerNormalization": 5},
    "bert": {"Gelu": 2, "SkipLayerNormalization": 4},
}
PROMPTS = ["four bit weights", "a longer prompt of several more words"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 300, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _real_rel(a, b, mask):
    """Relative error over real tokens: a padding query's output is undefined (GroupQueryAttention and the plain
    graph fill it differently, and no caller reads it)."""
    real = mask.bool()
    return _rel(a[real], b[real])


@pytest.fixture(scope="module")
def llama_pair(model_dirs, tmp_path_factory):
    """The tiny Llama as fused and plain ONNX artifacts."""
    root = tmp_path_factory.mktemp("llama_onnx")
    return tuple(lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=root / name, target="onnx", quiet=True,
                                onnx_fusions=fusions) for name, fusions in (("f", True), ("p", False)))


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_fused_and_plain_onnx_agree(arch, model_dirs, tmp_path, llama_pair):
    if arch == "llama":
        fused, plain = llama_pair
    else:
        fused = lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "f", target="onnx", quiet=True)
        plain = lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "p", target="onnx", quiet=True,
                               onnx_fusions=False)
    mf, mp = read_manifest(fused)["onnx"], read_manifest(plain)["onnx"]
    assert {k: v for k, v in mf["fusions"].items() if v} == EXPECTED[arch]
    assert mp["fusions"] == {}
    shown = describe(fused)
    assert all(f"{op} x{n}" in shown for op, n in EXPECTED[arch].items()) and "ONNX Runtime fusions" in shown
    for op, n in EXPECTED[arch].items():
        assert mf["ops"].get(f"com.microsoft::{op}", mf["ops"].get(op)) == n, (op, mf["ops"])
    ids, mask = _inputs()
    ef, ep = lowbit.load(fused, backend="ort"), lowbit.load(plain, backend="ort")
    assert _real_rel(ef.forward(ids, mask), ep.forward(ids, mask), mask) < 1e-4
    if arch != "bert":
        # Two prompts of different lengths: the shorter one is left-padded in prefill and every decode step.
        assert ef.generate(PROMPTS, max_new_tokens=8) == ep.generate(PROMPTS, max_new_tokens=8)


def test_group_query_attention_matches_torch(llama_pair, model_dirs):
    """The fused attention against the torch backend of the same artifact, prefill and decode, and the packed Q/K/V
    projection feeding it directly."""
    import onnx

    fused, _ = llama_pair
    model = onnx.load(str(fused / "onnx" / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)       # packed QKV, one MatMulNBits feeds it
    assert not any(n.op_type in ("Softmax", "Cos", "Sin") for n in model.graph.node)
    ids, mask = _inputs()
    et, eo = lowbit.load(fused, backend="torch"), lowbit.load(fused, backend="ort")
    assert _real_rel(eo.forward(ids, mask), et.forward(ids, mask), mask) < 1e-3
    assert eo.generate(PROMPTS, max_new_tokens=8) == et.generate(PROMPTS, max_new_tokens=8)


def test_wrong_rotary_cache_is_caught(llama_pair, tmp_path):
    """Negative control: the same graph with its rotary cos cache shifted by one position (cos and sin then
    disagree) fails both tolerances the tests above use."""
    import onnx
    from onnx import numpy_helper

    fused, plain = llama_pair
    broken = tmp_path / "broken"
    shutil.copytree(fused, broken)
    path = broken / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if t.name.startswith("gqa_cos_cache"))
    init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
    onnx.save(model, str(path))
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["files"]["onnx/model.onnx"] = sha256_file(path)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    ids, mask = _inputs()
    out = lowbit.load(broken, backend="ort").forward(ids, mask)
    assert _real_rel(out, lowbit.load(plain, backend="ort").forward(ids, mask), mask) > 1e-3


def test_attention_rule_reports_why_it_does_not_match(llama_pair):
    """Wrong head counts for the graph: nothing is rewritten and each layer says why."""
    import onnx_ir as ir

    from lowbit.lowering.onnx.ort_attention import fuse_group_query_attention

    _, plain = llama_pair
    model = ir.load(str(plain / "onnx" / "model.onnx"))
    before = len(list(model.graph))
    fused, skipped = fuse_group_query_attention(model, kv_heads=[3, 3], max_positions=256)
    assert fused == 0 and len(list(model.graph)) == before
    assert skipped == [f"layer {i}: the projections' widths do not give whole heads" for i in range(2)]
    fused, skipped = fuse_group_query_attention(model, kv_heads=[2, 2], max_positions=256)
    assert fused == 2 and skipped == []


def test_sliding_window_keeps_plain_attention(more_model_dirs, tmp_path):
    """Mistral's window is a mask GroupQueryAttention would not apply: the attention stays plain ops, the manifest
    and ``lowbit inspect`` say why, and the graph still matches the torch backend."""
    art = lowbit.compile(str(more_model_dirs["mistral"]), "rtn-w4g64", out=tmp_path / "m", target="onnx", quiet=True)
    onnx_info = read_manifest(art)["onnx"]
    assert not onnx_info["fusions"].get("GroupQueryAttention")
    assert "sliding window" in onnx_info["fusions_missed"]["GroupQueryAttention"]
    assert "GroupQueryAttention not fused: the model's attention mask" in describe(art)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 300, (1, 20), generator=g)
    mask = torch.ones_like(ids)
    out_ort = lowbit.load(art, backend="ort").forward(ids, mask)
    assert _rel(out_ort, lowbit.load(art, backend="torch").forward(ids, mask)) < 1e-3


def test_in_place_cache_matches_the_concatenated_one(llama_pair):
    """With GroupQueryAttention in every layer the ORT session keeps the cache in preallocated buffers that the graph
    writes in place; prefill (left-padded) and decode steps give the logits of the growing cache."""
    from lowbit.errors import LowbitError
    from lowbit.runtime.generation import mask_positions as mask_positions_np
    from lowbit.runtime.ort_session import KVBuffers, OrtSession

    fused, plain = llama_pair
    session = OrtSession(fused, read_manifest(fused))
    assert session.in_place_cache and not OrtSession(plain, read_manifest(plain)).in_place_cache
    ids, mask = (t.numpy() for t in _inputs())
    steps = 4
    buffers = session.start(2, ids.shape[1] + steps)
    assert isinstance(buffers, KVBuffers) and buffers[0].shape()[2] == ids.shape[1] + steps
    runs = []
    for cache in (session.start(2), buffers):
        m, pos = mask, mask_positions_np(mask)
        logits, cache = session.step_np(ids, m, pos, cache)
        out = [logits[mask.astype(bool)]]
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)[:, None]
            m, pos = np.concatenate([m, np.ones_like(nxt)], 1), pos[:, -1:] + 1
            logits, cache = session.step_np(nxt, m, pos, cache)
            out.append(logits[:, -1])
        runs.append(out)
    assert cache is buffers
    for a, b in zip(*runs):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    with pytest.raises(LowbitError, match="holds 15 positions"):
        session.step_np(ids[:, :1], np.ones((2, 16), np.int64), np.full((2, 1), 15), buffers)


def _tanh_gelu_model(cube_coef: float):
    """x -> GPT-2's tanh GELU as plain ONNX ops, with ``cube_coef`` in place of 0.044715."""
    import math

    from onnx import TensorProto, helper

    def c(name, v):
        return helper.make_tensor(name, TensorProto.FLOAT, [], [v])

    nodes = [helper.make_node("Pow", ["x", "three"], ["cube"]),
             helper.make_node("Mul", ["coef", "cube"], ["scaled"]),
             helper.make_node("Add", ["x", "scaled"], ["inner"]),
             helper.make_node("Mul", ["inner", "k"], ["arg"]),
             helper.make_node("Tanh", ["arg"], ["t"]),
             helper.make_node("Add", ["one", "t"], ["onep"]),
             helper.make_node("Mul", ["half", "x"], ["hx"]),
             helper.make_node("Mul", ["hx", "onep"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])],
                              [c("three", 3.0), c("coef", cube_coef), c("k", math.sqrt(2 / math.pi)), c("one", 1.0),
                               c("half", 0.5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("coef,fused", [(0.044715, 1), (0.05, 0)])
def test_tanh_gelu_rule_fires_only_on_the_formula(coef, fused):
    import onnx_ir as ir
    import onnxruntime as ort

    from lowbit.lowering.onnx.ort_gelu import fuse_tanh_gelu

    proto = _tanh_gelu_model(coef)
    model = ir.serde.deserialize_model(proto)
    assert fuse_tanh_gelu(model) == fused
    ops = [n.op_type for n in model.graph]
    assert ops == (["FastGelu"] if fused else [n.op_type for n in proto.graph.node])
    x = np.random.default_rng(5).standard_normal((2, 7)).astype(np.float32) * 3
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (proto, ir.serde.serialize_model(model))]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)
