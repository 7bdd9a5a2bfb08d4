"""End to end on tiny random-weight models: Llama, Qwen2, OPT, GPT-2 and BERT in depth (trace, RTN, artifact,\nruntime, generate), and eleven more decoder families through compile, eval and cached generation."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.frontend.load import load_model
from lowbit.frontend.trace import trace
from lowbit.passes.recipe import Recipe
from lowbit.passes.settings import Scheme
from lowbit.passes.rtn import rtn_pass

from tests.conftest import ARCHS, CAUSAL, MORE_CAUSAL, VOCAB, transformers_perplexity

EXPECTED_SITES = {"llama": 2 * 7 + 1, "qwen2": 2 * 7 + 1, "opt": 2 * 6 + 1, "gpt2": 2 * 4 + 1, "bert": 2 * 6}




def _reference(model, ids, mask):
    """The float model's output. Causal LMs get positions that skip left padding, as the traced step, the
    Engine and transformers' generate use."""
    kw = {}
    if model.config.model_type != "bert":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None \
        else out.logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(2, VOCAB, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                      # a left-padded row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_finds_every_matmul_and_block(arch, model_dirs, inputs):
    loaded = load_model(str(model_dirs[arch]))
    graph = trace(loaded)
    assert len(graph.sites) == EXPECTED_SITES[arch]
    blocks = [b for b in graph.blocks if b]
    assert len(blocks) == 2
    for site in graph.sites.values():
        # Every site names a real module, and the IR weight is that module's [out, in] weight.
        mod = loaded.model.get_submodule(site.name)
        w = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight
        assert torch.equal(graph.weight(site), w.detach())
    ids, mask = inputs
    with torch.no_grad():                # dynamic shapes: another batch and length than traced
        assert torch.allclose(graph(ids, mask), _reference(loaded.model, ids, mask), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn8_in_graph_and_runtime_close_to_float(arch, model_dirs, inputs, tmp_path):
    ids, mask = inputs
    recipe = Recipe("w8g32", "rtn", Scheme(bits=8, group_size=32))
    loaded = load_model(str(model_dirs[arch]))
    with torch.no_grad():
        ref = _reference(loaded.model, ids, mask)
    graph = trace(loaded)
    rtn_pass(graph, recipe, show_progress=False)
    assert len(graph.quantized) == EXPECTED_SITES[arch] - (0 if arch == "bert" else 1)   # lm_head float
    assert not any(n.target == torch.ops.aten.linear.default and n.args[1].op == "get_attr"
                   and "lm_head" not in n.args[1].target for n in graph.gm.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        in_graph = graph(ids, mask)
    assert 0 < _rel(in_graph, ref) < 1e-2

    out = lowbit.compile(str(model_dirs[arch]), recipe, out=tmp_path / "art", quiet=True)
    eng = lowbit.load(out)
    got = eng.forward(ids, mask)
    assert 0 < _rel(got, ref) < 1e-2
    # Artifact round trip: the runtime computes exactly what the quantized graph computes.
    assert torch.allclose(got, in_graph, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn4_runs_and_stays_correlated(arch, model_dirs, inputs, tmp_path):
    ids, mask = inputs
    out = lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "a4", quiet=True)
    eng = lowbit.load(out)
    loaded = load_model(str(model_dirs[arch]))
    with torch.no_grad():
        ref = _reference(loaded.model, ids, mask)
    got = eng.forward(ids, mask)
    assert torch.isfinite(got).all()
    err8 = _rel(lowbit.load(lowbit.compile(str(model_dirs[arch]), "rtn-w8", out=tmp_path / "a8", quiet=True))
                .forward(ids, mask), ref)
    assert err8 < _rel(got, ref) < 0.5         # 4-bit is worse than 8-bit but still the same function
    layers = json.loads((out / "graph.json").read_text())["layers"]
    tensors = load_file(str(out / "weights.safetensors"))
    # A layer's codes are stored alone or, after the sibling merge, as rows of "<prefix>.q_proj+k_proj+v_proj".
    merged = {}
    for key in tensors:
        if key.endswith(".qweight") and "+" in key:
            prefix, _, names = key[:-len(".qweight")].rpartition(".")
            merged.update({f"{prefix}.{n}": key for n in names.split("+")})
    rows = {}
    for name, spec in layers.items():
        assert spec["bits"] == 4 and f"{name}.weight" not in tensors
        key = f"{name}.qweight" if f"{name}.qweight" in tensors else merged[name]
        assert tensors[key].dtype == torch.uint8 and tensors[key].shape[1] == (spec["in_features"] * 4 + 7) // 8
        rows[key] = rows.get(key, 0) + spec["out_features"]
    assert all(tensors[key].shape[0] == n for key, n in rows.items())


@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_with_kv_cache_matches_full_recompute(arch, model_dirs, tmp_path):
    eng = lowbit.load(lowbit.compile(str(model_dirs[arch]), "rtn-w4g64", out=tmp_path / "a", quiet=True),
                      kernels="reference")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0        # left padding in a batch of prompts
    gen = eng.generate_ids(ids, mask, max_new_tokens=8, stop_at_eos=False)
    assert gen.shape == (2, 17)
    seq, m = ids, mask
    for _ in range(8):                   # no cache: every step recomputes the whole sequence
        nxt = eng.forward(seq, m)[:, -1].argmax(-1)
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(nxt[:, None])], 1)
    assert torch.equal(gen, seq)


def test_generate_text_batch_and_sampling(model_dirs, tmp_path):
    eng = lowbit.load(lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", quiet=True))
    texts = eng.generate(["the model reads", "four bit weights stream faster than"], max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    a = eng.generate("the model", max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=3)
    b = eng.generate("the model", max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=3)
    assert a == b                         # seeded sampling is reproducible


def test_lm_head_quantized_when_asked(model_dirs, tmp_path, inputs):
    r = Recipe("head", "rtn", Scheme(bits=8, group_size=32, quantize_lm_head=True))
    out = lowbit.compile(str(model_dirs["llama"]), r, out=tmp_path / "a", quiet=True)   # tied embeddings
    layers = json.loads((out / "graph.json").read_text())["layers"]
    assert "lm_head" in layers
    eng = lowbit.load(out)
    ids, mask = inputs
    loaded = load_model(str(model_dirs["llama"]))
    with torch.no_grad():
        ref = _reference(loaded.model, ids, mask)
    assert _rel(eng.forward(ids, mask), ref) < 1e-2
    # The embedding stays float and exact although lm_head shared its weight.
    tensors = load_file(str(out / "weights.safetensors"))
    assert torch.equal(tensors["model.embed_tokens.weight"], loaded.model.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_embedding_quantized_when_asked(arch, model_dirs, inputs, tmp_path):
    r = Recipe("emb", "rtn", Scheme(bits=8, group_size=32, quantize_embeddings=True))
    out = lowbit.compile(str(model_dirs[arch]), r, out=tmp_path / "a", quiet=True)
    layers = json.loads((out / "graph.json").read_text())["layers"]
    emb_name = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "embeddings.word_embeddings"}[arch]
    assert layers[emb_name]["op"] == "wna16_embedding" and layers[emb_name]["out_features"] == VOCAB
    tensors = load_file(str(out / "weights.safetensors"))
    assert f"{emb_name}.weight" not in tensors and f"{emb_name}.qweight" in tensors
    ids, mask = inputs
    loaded = load_model(str(model_dirs[arch]))
    with torch.no_grad():
        ref = _reference(loaded.model, ids, mask)
    eng = lowbit.load(out)
    assert 0 < _rel(eng.forward(ids, mask), ref) < 1e-2
    if arch != "bert":                  # the float lm_head keeps its (formerly tied) weight exactly
        assert torch.equal(tensors["lm_head.weight"], loaded.model.get_output_embeddings().weight)


@pytest.mark.parametrize("arch", sorted(MORE_CAUSAL))
@pytest.mark.slow
def test_more_architectures_compile_run_eval(arch, more_model_dirs, text_file, tmp_path):
    """Any architecture that traces: the fp artifact's perplexity equals transformers' labels= computation;
    RTN and GPTQ w4g64 compile, quantize every linear layer but the output head, stay within a few percent of
    fp, and generate with the KV cache exactly what recomputing the whole sequence gives (sliding windows
    shorter than the sequence included; with the reference kernels, which compute every step as the prefill
    does)."""
    from lowbit.compiler.pipeline import CalibrationArgs
    from lowbit.tools.eval import evaluate_perplexity

    d = str(more_model_dirs[arch])
    fp_art = lowbit.compile(d, "fp", out=tmp_path / "fp", quiet=True)
    fp = evaluate_perplexity(str(fp_art), str(text_file), seq_len=32, max_windows=3, show_progress=False)
    ref, n = transformers_perplexity(d, text_file.read_text(), 32, 3)
    assert fp["windows"] == n == 3 and abs(fp["ppl"] / ref - 1) < 1e-4
    model = load_model(d).model
    head = model.get_output_embeddings()
    linears = {name for name, m in model.named_modules() if m is not head
               and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}
    for recipe, kw in (("rtn-w4g64", {}),
                       ("gptq-w4g64", {"calib": CalibrationArgs(str(text_file), samples=4, seq_len=32)})):
        art = lowbit.compile(d, recipe, out=tmp_path / recipe, quiet=True, **kw)
        assert set(json.loads((art / "graph.json").read_text())["layers"]) == linears, recipe
        q = evaluate_perplexity(str(art), str(text_file), seq_len=32, max_windows=3, show_progress=False)
        assert q["tokens"] == fp["tokens"] and abs(q["ppl"] / fp["ppl"] - 1) < 0.05, (recipe, q["ppl"], fp["ppl"])
    eng = lowbit.load(art, kernels="reference")    # exact steps: the CPU kernels take few tokens in bfloat16
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0
    gen = eng.generate_ids(ids, mask, max_new_tokens=6, stop_at_eos=False)
    seq, m = ids, mask
    for _ in range(6):
        nxt = eng.forward(seq, m)[:, -1].argmax(-1)
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(nxt[:, None])], 1)
    assert torch.equal(gen, seq)


_NO_MODELING = """
import re, sys
import lowbit
eng = lowbit.load(sys.argv[1])
print(eng.generate("the model reads", max_new_tokens=4))
if len(sys.argv) > 2:                      # negative control: a transformers model in the same process
    from lowbit.frontend.load import load_model
    load_model(sys.argv[2])
modeling = [m for m in sys.modules if re.match(r"transformers[.]models[.].*[.]modeling_", m)]
assert not modeling, modeling
compiler = [m for m in sys.modules if re.match(r"lowbit[.](compiler|passes|rules)", m)]
assert not compiler, compiler
"""


def test_runtime_runs_the_shipped_graph_without_transformers_modeling(model_dirs, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "a", quiet=True)
    ok = subprocess.run([sys.executable, "-c", _NO_MODELING, str(art)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", _NO_MODELING, str(art), str(model_dirs["llama"])],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "modeling_llama" in bad.stderr
