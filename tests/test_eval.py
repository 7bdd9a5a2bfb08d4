"""Perplexity: our windows and numbers equal an independent transformers computation."""

import math

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval import evaluate_perplexity, windows


def _independent_ppl(model_dir, text, seq_len, max_windows):
    """Plain transformers: tokenize, cut non-overlapping windows, mean loss from labels=."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    losses = []
    for w in range(min(len(ids) // seq_len, max_windows)):
        chunk = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
        with torch.no_grad():
            losses.append(float(model(input_ids=chunk, labels=chunk).loss))
    return math.exp(sum(losses) / len(losses)), len(losses)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float_perplexity_equals_independent_transformers(arch, model_dirs, text_file):
    ours = evaluate_perplexity(str(model_dirs[arch]), str(text_file), seq_len=64, max_windows=6, show_progress=False)
    ref, n = _independent_ppl(model_dirs[arch], text_file.read_text(), 64, 6)
    assert ours["windows"] == n == 6 and ours["tokens"] == 6 * 63
    assert abs(ours["ppl"] / ref - 1) < 1e-4


def test_artifact_perplexity_close_to_float_at_8_bits(model_dirs, text_file, tmp_path):
    art = lowbit.compile(str(model_dirs["llama"]), "rtn-w8", out=tmp_path / "a", quiet=True)
    fp = evaluate_perplexity(str(model_dirs["llama"]), str(text_file), seq_len=64, max_windows=4, show_progress=False)
    q = evaluate_perplexity(str(art), str(text_file), seq_len=64, max_windows=4, show_progress=False)
    assert q["tokens"] == fp["tokens"] and abs(q["ppl"] / fp["ppl"] - 1) < 0.01


def test_windows_need_enough_text(tokenizer):
    assert windows(tokenizer, "the model reads " * 40, 16).shape[1] == 16
    with pytest.raises(LowbitError, match="too short for one window"):
        windows(tokenizer, "the model", 64)
    with pytest.raises(LowbitError, match="has 0 tokens"):
        windows(tokenizer, "   \n", 64)
