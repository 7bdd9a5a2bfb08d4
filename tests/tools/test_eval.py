"""Perplexity: our windows and numbers equal an independent transformers computation."""

import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.metrics import windows
from lowbit.tools.eval import evaluate_perplexity

from tests.conftest import transformers_perplexity


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_float_perplexity_equals_independent_transformers(arch, model_dirs, text_file):
    ours = evaluate_perplexity(str(model_dirs[arch]), str(text_file), seq_len=64, max_windows=6, show_progress=False)
    ref, n = transformers_perplexity(model_dirs[arch], text_file.read_text(), 64, 6)
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
