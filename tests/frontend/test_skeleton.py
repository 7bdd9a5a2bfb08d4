"""Tracing without weights (frontend/skeleton.py): a model whose parameters are FakeTensors traces to the graph
the real model traces to, with the real non-persistent buffers, and holds no parameter memory."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from lowbit.frontend.load import LoadedModel, model_class, task_of
from lowbit.frontend.skeleton import weightless_model
from lowbit.frontend.trace import trace

from tests.conftest import CAUSAL, MORE_CAUSAL, make_config


def _calls(graph) -> list[str]:
    return [str(n.target) for n in graph.gm.graph.nodes if n.op == "call_function"]


def _traced(model, config, decode_check=True):
    return trace(LoadedModel(model, None, config, None, task_of(config)), decode_check=decode_check)


def _check(arch: str):
    config = make_config(arch)
    real = model_class(config)._from_config(config).eval()
    skeleton = weightless_model(config)
    assert all(isinstance(p, FakeTensor) for p in skeleton.parameters())
    assert len(list(skeleton.parameters())) == len(list(real.parameters()))        # tied weights stay tied
    buffers = dict(real.named_buffers())
    for name, b in skeleton.named_buffers():
        assert not isinstance(b, FakeTensor) and torch.equal(b, buffers[name]), name
    fake_graph, real_graph = _traced(skeleton, config, decode_check=False), _traced(real, config)
    assert _calls(fake_graph) == _calls(real_graph)
    assert [s.name for s in fake_graph.sites.values()] == [s.name for s in real_graph.sites.values()]
    return fake_graph, real_graph


@pytest.mark.parametrize("arch", [*CAUSAL, "bert"])
def test_weightless_trace_is_the_real_trace(arch):
    _check(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MORE_CAUSAL))
def test_weightless_trace_every_family(arch):
    _check(arch)


def test_the_comparison_can_fail():
    """Negative controls: another rotary base changes the buffers, another architecture the calls."""

    config = make_config("llama")
    other = make_config("llama")
    other.rope_theta = 1234.0
    if hasattr(other, "rope_parameters") and isinstance(other.rope_parameters, dict):
        other.rope_parameters = {**other.rope_parameters, "rope_theta": 1234.0}
    a = dict(weightless_model(config).named_buffers())
    b = dict(weightless_model(other).named_buffers())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    llama = _traced(weightless_model(config), config, decode_check=False)
    gpt2_config = make_config("gpt2")
    gpt2 = _traced(weightless_model(gpt2_config), gpt2_config, decode_check=False)
    assert _calls(llama) != _calls(gpt2)

