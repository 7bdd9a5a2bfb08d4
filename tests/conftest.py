"""Shared fixtures: tiny random-weight models (Llama, Qwen2, OPT, GPT-2, BERT) saved as local folders.

Each folder carries a small byte-level BPE tokenizer trained here on generated text, so the text paths
(eval, run, generate) are exercised without downloading anything.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (make test runs one worker per core) each worker computes on one thread: two workers with a
# thread per core each would oversubscribe the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)
# Without a GPU the Triton kernels (lowbit.kernels.triton) run in Triton's CPU interpreter. Triton reads this
# when a kernel is decorated, so it must be set before anything imports triton: conftest loads first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 320
ARCHS = ("llama", "qwen2", "opt", "gpt2", "bert")
CAUSAL = ("llama", "qwen2", "opt", "gpt2")
WORDS = ("the model reads every weight once per step so four bit weights stream faster than sixteen bit "
         "ones quantization maps each group of columns onto a small integer grid with one scale and zero "
         "point perplexity measures how surprised a language model is by real text").split()


def sample_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines) + "\n"


def non_vnni_matmul_integer(a: np.ndarray, b: np.ndarray, a_zero: int, b_zero: int) -> np.ndarray:
    """What an integer GEMM computes on x86 without VNNI (ONNX Runtime's MLAS on AVX2 / AVX-512 core), for
    a [..., M, K] and b [..., K, N]: uint8 x int8 multiplies raw codes with ``vpmaddubsw``, which adds each
    adjacent pair of products (k = 2i, 2i + 1) into a saturating int16; the zero points are taken off
    exactly afterwards from row and column sums. Other type pairs widen first and are exact. The oracle of
    the exactness tests, checked bit for bit against ONNX Runtime on an AVX2 machine."""
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    k = a.shape[-1]
    if a.dtype == np.uint8 and b.dtype == np.int8:
        pad = k % 2
        a2 = np.pad(a64, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b2 = np.pad(b64, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
        prod = a2[..., :, :, None] * b2[..., None, :, :]                    # [..., M, K, N]
        raw = np.clip(prod[..., 0::2, :] + prod[..., 1::2, :], -32768, 32767).sum(-2)
    else:
        raw = a64 @ b64
    return raw - a_zero * b64.sum(-2, keepdims=True) - b_zero * a64.sum(-1, keepdims=True) + k * a_zero * b_zero


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sample_text(3000, 0)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, eos_token_id=0, bos_token_id=0, pad_token_id=1)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, pad_token_id=1, vocab_size=VOCAB)
    if arch in MORE_CAUSAL:
        return MORE_CAUSAL[arch](tf, common)
    raise ValueError(arch)


# More decoder families, one tiny config each: the seed papers' BLOOM and GPT-NeoX, fused QKV (Phi-3, Falcon,
# GPT-NeoX, BLOOM), parallel attention + MLP blocks (GPT-NeoX, GPT-J, Falcon, Phi-2), ALiBi (BLOOM), partial
# rotary (GPT-NeoX, GPT-J, StableLM, Phi-2), sliding-window attention shorter than the test sequences
# (Mistral, Gemma-3), multi-query attention (Falcon).
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
MORE_CAUSAL = {
    "mistral": lambda tf, c: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=8, **c),
    "qwen3": lambda tf, c: tf.Qwen3Config(**_LLAMA_LIKE, head_dim=16, **c),
    "phi3": lambda tf, c: tf.Phi3Config(**_LLAMA_LIKE, **c),
    "gemma": lambda tf, c: tf.GemmaConfig(**_LLAMA_LIKE, head_dim=16, **c),
    "gemma3_text": lambda tf, c: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=8, **c),
    "stablelm": lambda tf, c: tf.StableLmConfig(**_LLAMA_LIKE, **c),
    "gpt_neox": lambda tf, c: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
                                               use_parallel_residual=True, **c),
    "bloom": lambda tf, c: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **c),
    "falcon": lambda tf, c: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            multi_query=True, parallel_attn=True, **c),
    "gptj": lambda tf, c: tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, **c),
    "phi": lambda tf, c: tf.PhiConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5,
                                      **c),
}


def make_model(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(make_config(arch)).eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of saved tiny models with tokenizers."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        d = root / arch
        make_model(arch).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out


CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first }}<{{ m['role'] }}>{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def chat_model(model_dirs, tokenizer, tmp_path_factory):
    """(folder, tokenizer) of the tiny Llama whose tokenizer has a chat template (CHAT_TEMPLATE)."""
    import shutil

    d = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(model_dirs["llama"], d)
    tok = tokenizer.__class__.from_pretrained(d)
    tok.chat_template, tok.bos_token = CHAT_TEMPLATE, "<pad>"
    tok.save_pretrained(d)
    return d, tok


@pytest.fixture(scope="session")
def more_model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of the MORE_CAUSAL tiny models with tokenizers."""
    root = tmp_path_factory.mktemp("more_models")
    out = {}
    for arch in MORE_CAUSAL:
        make_model(arch).save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def transformers_perplexity(model_dir, text: str, seq_len: int, max_windows: int) -> tuple[float, int]:
    """Plain transformers: tokenize, cut non-overlapping windows, mean loss from labels= (lowbit's protocol)."""
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


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(sample_text(4000, 1))
    return p


def rel_error(a, b, mask=None) -> float:
    """max |a - b| / max |b| (over ``mask``'s positions when given)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def assert_cached_steps_match(ref, eng, ids, mask, bar: float) -> None:
    """Two engines agree within ``bar`` on a left-padded prefill and two greedy decode steps, each through its own
    KV cache (the reference's tokens drive both)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    lt, ct = ref.forward(ids, mask, position_ids=pos)
    lo, co = eng.forward(ids, mask, position_ids=pos)
    assert rel_error(lo, lt, mask.bool()) < bar
    for _ in range(2):
        nxt = lt[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        lt, ct = ref.forward(nxt, mask, ct, pos)
        lo, co = eng.forward(nxt, mask, co, pos)
        assert rel_error(lo, lt) < bar


class W8A8Layer:
    """A symmetric W8A8 layer in lowbit's packed layout, callable as ``lowbit::w8a8_linear`` (the reference)."""

    def __init__(self, qweight, scales, zeros, bias, bits: int, group_size: int, in_features: int):
        self.qweight, self.scales, self.zeros, self.bias = qweight, scales, zeros, bias
        self.bits, self.group_size, self.in_features = bits, group_size, in_features

    def __call__(self, x):
        return torch.ops.lowbit.w8a8_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                            self.group_size, self.in_features)


class OrtA8(torch.nn.Module):
    """``layer`` (a W8A8Layer) as the ONNX lowering writes it: one ``lowbit::ort_matmul_a8`` on repacked tensors,
    or, with ``norm_weight``, RMSNorm + INT8 quantize feeding ``lowbit::ort_matmul_a8_codes``."""

    def __init__(self, layer, norm_weight=None):
        from lowbit.lowering.onnx.ort_ops import to_matmul_a8

        super().__init__()
        t = to_matmul_a8(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)
        self.w, self.scales, self.bias, self.norm_weight = t["w"], t["scales"], layer.bias, norm_weight
        self.args = (layer.in_features, layer.qweight.shape[0], layer.group_size, t["w_zero"])

    def forward(self, x):
        if self.norm_weight is None:
            return torch.ops.lowbit.ort_matmul_a8(x, self.w, self.scales, self.bias, *self.args)
        xq, sx = torch.ops.lowbit.rmsnorm_quant_int8(x, self.norm_weight, 1e-6)
        return torch.ops.lowbit.ort_matmul_a8_codes(xq, sx, self.w, self.scales, self.bias, *self.args, torch.float32)


def dequantized_layers(artifact) -> dict[str, torch.Tensor]:
    """{layer: float32 weight [N, K]} of a torch artifact compiled with fuse=False, from its own stored codes."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from lowbit.ops import dequantized_weight

    t = load_file(str(Path(artifact) / "weights.safetensors"))
    layers = json.loads((Path(artifact) / "graph.json").read_text())["layers"]
    return {name: dequantized_weight(t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"], spec["bits"],
                                     spec["group_size"], spec["in_features"]) for name, spec in layers.items()}
