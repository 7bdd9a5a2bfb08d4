"""The traced step graph (ids, mask, positions, past K/V -> logits, present K/V) on every tiny decoder: a
prefill then cached steps equal transformers' own cached steps, and its full forward on an unpadded row."""

import pytest
import torch
from transformers import DynamicCache

from lowbit.frontend.load import LoadedModel
from lowbit.frontend.trace import trace
from lowbit.passes.recipe import Recipe
from lowbit.passes.settings import Scheme
from lowbit.passes.rtn import rtn_pass

from tests.conftest import CAUSAL, MORE_CAUSAL, VOCAB, make_model

STEP_ARCHS = list(CAUSAL) + list(MORE_CAUSAL)
# Their attention code is their own (not transformers' AttentionInterface) and branches on a one-token
# query: torch.export guards the step on two or more tokens, and the frontend proves the same graph right for
# one token (frontend._decode_check).
OWN_ATTENTION = {"bloom", "falcon", "stablelm"}


def _traced(arch):
    model = make_model(arch)
    return model, trace(LoadedModel(model, None, model.config, None, "causal-lm"))


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (2, 13), generator=g)     # longer than the sliding windows (8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                          # a left-padded row
    return ids, mask


def _transformers_steps(model, ids, mask, cuts):
    cache, logits = DynamicCache(), []
    for a, b in zip([0] + cuts, cuts):
        logits.append(model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=_positions(mask[:, :b])[:, a:],
                            past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def _run_steps(graph, ids, mask, cuts):
    """Logits of ids[:, :cuts[0]] as a prefill, then of each ids[:, a:b] as a cached step."""
    out = graph.gm(*graph.step_args(ids[:, :cuts[0]], mask[:, :cuts[0]]))
    logits, past = [out[0]], list(out[1:])
    for a, b in zip(cuts, cuts[1:]):
        out = graph.gm(*graph.step_args(ids[:, a:b], mask[:, :b], past))
        logits.append(out[0])
        past = list(out[1:])
        assert all(t.shape[2] == b for t in past)               # present = past + this step
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", STEP_ARCHS)
def test_step_graph_prefill_then_cached_steps_equal_full_forward(arch):
    model, graph = _traced(arch)
    ids, mask = _inputs()
    cuts = [10, 12, 13]    # a prefill, a two-token step, then a one-token step
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, :cuts[-1]]
        ref = _transformers_steps(model, ids, mask, cuts)
        got = _run_steps(graph, ids, mask, cuts)
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    # transformers' BLOOM steps and full forward disagree on a left-padded row (ALiBi); the unpadded row must not.
    assert torch.allclose(got[0], full[0], atol=1e-5), float((got[0] - full[0]).abs().max())
    if arch not in OWN_ATTENTION:
        assert any(n.target is torch.ops.lowbit.attention.default for n in graph.gm.graph.nodes)


def test_step_graph_cache_is_consumed():
    """Negative control: the same step with the past replaced by other keys/values gives other logits, so the
    equality above cannot come from a step that ignores its cache."""
    model, graph = _traced("llama")
    ids, mask = _inputs()
    with torch.no_grad():
        out = graph.gm(*graph.step_args(ids[:, :10], mask[:, :10]))
        past = list(out[1:])
        good = graph.gm(*graph.step_args(ids[:, 10:12], mask[:, :12], past))[0]
        bad = graph.gm(*graph.step_args(ids[:, 10:12], mask[:, :12], [torch.randn_like(t) for t in past]))[0]
    assert (good - bad).abs().max() > 1e-2


def test_quantized_step_graph_decodes_like_its_prefill():
    """After RTN the step graph still computes one function: cached steps equal one prefill of the same tokens."""
    _, graph = _traced("qwen2")
    rtn_pass(graph, Recipe("w4g32", "rtn", Scheme(bits=4, group_size=32)), show_progress=False)
    ids, mask = _inputs()
    with torch.no_grad():
        whole = graph(ids, mask)
        steps = _run_steps(graph, ids, mask, [9, 12, 13])
    assert torch.allclose(steps, whole, atol=1e-5)


def test_decode_check_catches_a_wrong_one_token_step():
    """Negative control of the frontend's one-token proof: a step graph that is wrong only for one token (as a
    specialized trace of a q_len == 1 branch would be) is caught."""
    from lowbit.frontend.trace import _decode_check

    _, graph = _traced("llama")
    assert _decode_check(graph) is None
    gm = graph.gm

    class OffForOneToken(torch.nn.Module):
        def forward(self, input_ids, *rest):
            out = gm(input_ids, *rest)
            return (out[0] + 0.01 * (input_ids.shape[1] == 1), *out[1:])

    graph.gm = OffForOneToken()
    assert "one-token step differs" in _decode_check(graph)
