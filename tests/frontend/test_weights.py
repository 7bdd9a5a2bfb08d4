"""Reading a checkpoint one tensor at a time (frontend/weights.py): every tensor of a single-file and of a sharded
save_pretrained folder, in its stored dtype, and hostile indexes refused with one line."""

import json
import shutil

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.frontend.weights import INDEX, CheckpointWeights

from tests.conftest import make_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model("qwen2").to(torch.bfloat16)
    root = tmp_path_factory.mktemp("weights")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    return model, root


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_every_tensor_reads_back_in_its_stored_dtype(saved, layout):
    model, root = saved
    w = CheckpointWeights(root / layout)
    state = model.state_dict()
    assert w.names() == set(state)
    if layout == "sharded":
        assert len(set(w.files.values())) > 1
    for name, t in state.items():
        got = w.read(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, t), name
        assert w.shape_dtype(name) == (tuple(t.shape), "BF16")
    name = next(iter(state))
    assert w.read(name, torch.float32).dtype == torch.float32
    other = make_model("qwen2", seed=1).to(torch.bfloat16).state_dict()       # negative control: another model
    assert any(not torch.equal(w.read(n), other[n]) for n in state)


def _broken(root, tmp_path, edit):
    folder = tmp_path / "m"
    shutil.copytree(root / "sharded", folder)
    edit(folder)
    return folder


@pytest.mark.parametrize("edit,needle", [
    (lambda f: (f / INDEX).write_text("[1, 2]"), "'weight_map' must map tensor names to shard file names"),
    (lambda f: (f / INDEX).write_text("{not json"), "cannot read"),
    (lambda f: (f / INDEX).write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}})),
     "is not a .safetensors file name in the model folder"),
    (lambda f: (f / INDEX).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}})), "is missing or lies"),
    (lambda f: [p.unlink() for p in f.glob("*.safetensors")][:0] or None, "is missing or lies outside"),
    (lambda f: [p.unlink() for p in f.glob("*.json") if p.name == INDEX][:0] or None, "has no model.safetensors"),
])
def test_hostile_checkpoints_are_one_line(saved, tmp_path, edit, needle):
    _, root = saved
    folder = _broken(root, tmp_path, edit)
    with pytest.raises(LowbitError) as e:
        CheckpointWeights(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_shard_linked_from_outside_is_refused(saved, tmp_path):
    _, root = saved
    folder = _broken(root, tmp_path, lambda f: None)
    shard = sorted(folder.glob("*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(LowbitError, match="is missing or lies outside"):
        CheckpointWeights(folder)


def test_a_missing_name_and_a_truncated_shard(saved, tmp_path):
    _, root = saved
    folder = _broken(root, tmp_path, lambda f: None)
    w = CheckpointWeights(folder)
    with pytest.raises(LowbitError, match="has no tensor 'model.nope'"):
        w.read("model.nope")
    name = sorted(w.names())[0]
    shard = folder / w.files[name]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LowbitError) as e:
        CheckpointWeights(folder).read(name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2", "bert"])
def test_a_weightless_trace_with_the_checkpoint_bound_computes_the_model(arch, tmp_path):
    """The streaming compile's graph: traced without weights, then given the checkpoint's tensors; it computes
    what the real model's trace computes and serves one-token decode."""
    from torch._subclasses.fake_tensor import FakeTensor

    from lowbit.frontend.load import LoadedModel, task_of
    from lowbit.frontend.skeleton import weightless_model
    from lowbit.frontend.trace import _decode_check, trace
    from lowbit.frontend.weights import bind

    model = make_model(arch)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    config, task = model.config, task_of(model.config)
    real = trace(LoadedModel(model, None, config, None, task))
    skeleton = weightless_model(config)
    graph = trace(LoadedModel(skeleton, None, config, None, task), decode_check=False)
    assert bind(graph, CheckpointWeights(tmp_path), skeleton) > 0
    assert not [n for n in graph.gm.graph.nodes if n.op == "get_attr"
                and isinstance(graph.attr(n.target), FakeTensor)]
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(graph(ids, mask), real(ids, mask))
    if task == "causal-lm":
        assert _decode_check(graph) is None
    # Negative control: bound from another model's checkpoint, the outputs differ.
    other = make_model(arch, seed=1)
    other.save_pretrained(tmp_path / "other")
    graph2 = trace(LoadedModel(weightless_model(config), None, config, None, task), decode_check=False)
    bind(graph2, CheckpointWeights(tmp_path / "other"), skeleton)
    with torch.no_grad():
        assert not torch.allclose(graph2(ids, mask), real(ids, mask))
