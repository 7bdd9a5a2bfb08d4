"""The static-cache form of the step (runtime/static_cache.py): fixed-capacity buffers written in place, equal
to the dynamic step on CPU for every architecture whose attention is lowbit's, sliding windows included."""

import pytest
import torch

import lowbit
from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.lowering.program import program
from lowbit.errors import LowbitError
from lowbit.format import program as program_format
from lowbit.format.program import mask_positions
from lowbit.runtime.static_cache import StaticCacheRunner
from lowbit.runtime.torch_runner import TorchRunner

from tests.conftest import CAUSAL, MORE_CAUSAL, make_model

OWN_ATTENTION = {"bloom", "falcon", "stablelm"}
STATIC_ARCHS = [a for a in list(CAUSAL) + list(MORE_CAUSAL) if a not in OWN_ATTENTION]
CUTS = [10, 12, 13, 14, 18]        # a left-padded prefill, a two-token step, then one-token steps (past the
                                   # 8-token sliding windows of Mistral and Gemma-3)


def _runner(arch) -> TorchRunner:
    model = make_model(arch)
    graph = trace(LoadedModel(model, None, model.config, None, "causal-lm"))
    doc, tensors = program(graph)
    return TorchRunner(program_format.decode(doc, tensors), doc)


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 320, (2, CUTS[-1]), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, mask_positions(mask)


def _steps(runner, cache, shift=0):
    """Logits of the valid positions over CUTS; ``shift`` moves where the static runner thinks a step starts
    (a negative control)."""
    ids, mask, pos = _inputs()
    out, prev = [], 0
    for c in CUTS:
        m = mask[:, :c + shift] if prev else mask[:, :c]
        logits, cache = runner.step(ids[:, prev:c], m, pos[:, prev:c], cache)
        out.append(logits[mask[:, prev:c].bool()])
        prev = c
    return torch.cat(out), cache


@pytest.mark.parametrize("arch", STATIC_ARCHS)
def test_static_step_equals_dynamic_step(arch):
    runner = _runner(arch)
    static = StaticCacheRunner(runner, capacity=24)
    cache = static.start(2)
    addresses = [t.data_ptr() for t in cache]
    want, _ = _steps(runner, runner.start(2))
    got, after = _steps(static, cache)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # In place: the same buffers at the same addresses, of the fixed capacity, now holding the keys.
    assert after is cache and [t.data_ptr() for t in after] == addresses
    assert all(t.shape[2] == 24 for t in after) and float(after[0][:, :, :CUTS[-1]].abs().sum()) > 0
    assert float(after[0][:, :, CUTS[-1]:].abs().sum()) == 0
    # The static body has no cat of the cache and writes it with index_copy_.
    targets = [n.target for n in static.body.graph.nodes]
    assert targets.count(torch.ops.aten.index_copy_.default) == len(cache)


def test_static_step_negative_controls():
    """Writing one position off gives other logits (so the equality above depends on where the step writes),
    a step past the capacity is refused, and an architecture with its own attention code has no static form."""
    runner = _runner("llama")
    want, _ = _steps(runner, runner.start(2))
    static = StaticCacheRunner(runner, capacity=24)
    got, _ = _steps(static, static.start(2), shift=-1)
    assert not torch.allclose(got, want, atol=1e-3)
    with pytest.raises(LowbitError, match="exceed the capacity of 16"):
        _steps(StaticCacheRunner(runner, capacity=16), StaticCacheRunner(runner, capacity=16).start(2))
    with pytest.raises(LowbitError, match="own code"):
        StaticCacheRunner(_runner("bloom"), capacity=24)


def test_static_step_of_a_fused_w8a8_artifact(model_dirs, tmp_path):
    """The shipped, fusion-rewritten program of a zq-w8a8 artifact (norm + quantize fused, merged Q/K/V)."""
    art = lowbit.compile(str(model_dirs["llama"]), "zq-w8a8", out=tmp_path / "a", quiet=True)
    runner = TorchRunner.load(art)
    assert any(n.target == torch.ops.lowbit.rmsnorm_quant_int8.default for n in runner.gm.graph.nodes)
    static = StaticCacheRunner(runner, capacity=20)
    want, _ = _steps(runner, runner.start(2))
    got, _ = _steps(static, static.start(2))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
