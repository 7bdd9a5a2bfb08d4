"""Lowering to a GGUF file llama.cpp loads (target ``gguf``): ``model.gguf`` in the artifact folder.

lowbit's symmetric grids are GGML's: a symmetric 4-bit group of 32 is a ``Q4_0`` block (one float16 scale d, the
group's largest-magnitude value on code 0, ``x = (q - 8) * d``) and a symmetric 8-bit group of 32 a ``Q8_0``
block (``d = max|x| / 127``, ``x = (q - 128) * d``). So GPTQ run on that grid (``gptq-q4_0``) writes its codes and
scales into the blocks as they are, and llama.cpp computes with exactly the weights the passes chose. Float tensors:
norms in F32, any other in the stored dtype (F32, F16 or BF16).

Block bytes, per row of K weights, K / 32 blocks each: ``Q4_0`` = d (float16) then 16 bytes, byte j holding code j
in its low nibble and code j + 16 in its high one; ``Q8_0`` = d (float16) then the 32 codes minus 128 as int8.

Architecture ``llama`` (LlamaForCausalLM): llama.cpp rotates query and key dimensions in adjacent pairs, transformers
in two halves, so each head's q_proj / k_proj rows are reordered (row i of a half goes to 2i, of the second half to
2i + 1), quantized rows and all. The tokenizer goes into the metadata as a byte-level BPE ("gpt2"): tokens, types,
merges, special ids and the chat template.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec
from lowbit.lowering.hf_checkpoint import ONLINE_REFUSAL, codes_of, recipe_specs

BLOCK = 32
ARCHITECTURES = {"llama": "llama"}         # transformers model_type -> GGUF architecture
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def ggml_type(spec: QuantSpec) -> str | None:
    """The GGML block type holding ``spec`` exactly, or None."""
    if spec.sym and not spec.act_bits and spec.group_size == BLOCK:
        return {4: "Q4_0", 8: "Q8_0"}.get(spec.bits)
    return None


def block_bytes(q) -> np.ndarray:
    """A quantized layer's GGML blocks, uint8 [N, K / 32 * block size]."""
    codes = codes_of(q).to(torch.int16).view(q.out_features, -1, BLOCK)              # [N, K/32, 32]
    d = q.scales.to(torch.float16).contiguous().view(torch.uint8).view(q.out_features, -1, 2)
    if q.spec.bits == 4:
        quants = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)
    else:
        quants = (codes - 128).to(torch.int8).view(torch.uint8)
    return torch.cat([d, quants], dim=2).reshape(q.out_features, -1).numpy()


def rope_pairs(n_heads: int, rows: int) -> torch.Tensor:
    """The row order taking transformers' rotary halves to llama.cpp's adjacent pairs (new row r <- old row)."""
    head = rows // n_heads
    half = torch.arange(head // 2)
    within = torch.stack([half, half + head // 2], dim=1).reshape(-1)            # 0, h/2, 1, h/2+1, ...
    return (torch.arange(n_heads).view(-1, 1) * head + within).reshape(-1)


def float_array(t: torch.Tensor):
    """(array, GGML type) of a float tensor: F32 for vectors (llama.cpp's norms), the stored dtype otherwise."""
    import gguf

    t = t.detach()
    if t.dim() == 1 or t.dtype == torch.float32:
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    if t.dtype == torch.float16:
        return t.numpy(), gguf.GGMLQuantizationType.F16
    return t.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1), \
        gguf.GGMLQuantizationType.BF16


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's split, for the ones lowbit can tell; else refused."""
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    if (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and tokenizer_json.get("normalizer") is None):
        return "gpt-2"
    raise LowbitError("target gguf writes byte-level BPE tokenizers with GPT-2's split; this model's tokenizer.json "
                      f"has model {model.get('type')!r} and pre-tokenizer {pre.get('type')!r}")


class GgufLowering:
    """The ``gguf`` target (``lowbit.targets``)."""
    name = "gguf"
    fuse = False             # transformers' layer layout
    streams = False          # writes from the transformers model's state dict
    dtypes = ("auto", "float32", "float16", "bfloat16")

    def refusal(self, recipe) -> str | None:
        if not recipe.quantizes:
            return "it needs quantized weights; use gptq-q4_0 or rtn-q4_0, not 'fp'"
        if recipe.online_rotate:
            return ONLINE_REFUSAL
        for spec in recipe_specs(recipe):
            if ggml_type(spec) is None:
                return (f"GGUF blocks hold symmetric 4 or 8-bit groups of 32 (Q4_0, Q8_0), not {spec.describe()}; "
                        "use gptq-q4_0 or rtn-q4_0")
        return None

    def prepare(self, recipe, options=None):
        why = self.refusal(recipe)
        if why:
            raise LowbitError(f"target gguf cannot hold recipe '{recipe.name}': {why}")
        return recipe

    def check(self, graph, recipe):
        from lowbit.passes.rtn import quantizable

        if graph.model_type not in ARCHITECTURES:
            raise LowbitError(f"target gguf writes the {', '.join(ARCHITECTURES)} architecture; this model is "
                              f"'{graph.model_type}'")
        names = {site.name for site, _ in quantizable(graph, recipe)}
        for site in graph.sites.values():
            if site.name != "lm_head" and site.name not in names:
                raise LowbitError(f"target gguf needs every block linear quantized; {site.name} would stay float")
            if site.in_features % BLOCK:
                raise LowbitError(f"target gguf stores blocks of {BLOCK} along K; layer {site.name} has "
                                  f"K={site.in_features}")

    def check_model(self, loaded):
        """Before the passes: the rotary embedding and the tokenizer this target writes."""
        rope = rope_parameters(loaded.config)
        if rope.get("rope_type", "default") != "default":
            raise LowbitError(f"target gguf writes plain rotary embeddings; this model's are "
                              f"'{rope.get('rope_type')}'")
        vocab, _, _ = tokenizer_vocab(loaded)
        if max(vocab.values()) >= loaded.config.vocab_size:
            raise LowbitError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's "
                              f"{loaded.config.vocab_size} embedding rows")

    def write(self, tmp, graph, loaded, recipe, options, timings: dict, quiet: bool) -> dict:
        from lowbit.progress import timed

        from lowbit.lowering.program import write_layers

        with timed(timings, "write", quiet, "writing the GGUF file"):
            write_layers(tmp, graph)
            return {"sizes": write_gguf(tmp / "model.gguf", graph, loaded)}


def write_gguf(path, graph, loaded) -> dict:
    import gguf

    from lowbit.lowering.program import artifact_tensors, size_report, untied_head

    config = loaded.config
    tied = config.tie_word_embeddings and not untied_head(graph, config)
    arch = ARCHITECTURES[graph.model_type]
    rope = rope_parameters(config)
    n_heads, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(loaded.path.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if any(q.spec.bits == 4 for q in graph.quantized.values())
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, loaded, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    order = {"q_proj": n_heads, "k_proj": n_kv}

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"target gguf has no GGUF name for tensor {key}")
        return name

    def reorder(layer: str, rows):
        kind = layer.rpartition(".")[2]
        return rows[rope_pairs(order[kind], rows.shape[0]).numpy()] if kind in order else rows

    for key, t in artifact_tensors(graph, loaded.model).items():
        layer, _, leaf = key.rpartition(".")
        if layer in graph.quantized or (leaf == "weight" and layer == "lm_head" and tied):
            continue
        array, kind = float_array(t)
        writer.add_tensor(gguf_name(key), reorder(layer, array), raw_dtype=kind)
    for layer, q in graph.quantized.items():
        if layer == "lm_head" and tied:
            continue                       # llama.cpp reads the output from token_embd
        kind = getattr(gguf.GGMLQuantizationType, ggml_type(q.spec))
        writer.add_tensor(gguf_name(f"{layer}.weight"), reorder(layer, block_bytes(q)), raw_dtype=kind)
        if q.bias is not None:
            writer.add_tensor(gguf_name(f"{layer}.bias"), reorder(layer, q.bias.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return size_report(graph, loaded.model, path.stat().st_size)


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


def tokenizer_vocab(loaded) -> tuple[dict, dict, str]:
    """({token: id} with the added tokens, tokenizer.json, llama.cpp's pre-tokenizer name) of a byte-level BPE
    tokenizer; others refused."""
    file = loaded.path / "tokenizer.json"
    if loaded.tokenizer is None or not file.is_file():
        raise LowbitError("target gguf needs the model's tokenizer.json (llama.cpp tokenizes from the GGUF itself)")
    data = json.loads(file.read_text(encoding="utf-8"))
    pre = pre_tokenizer(data)
    vocab = dict(data["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab, data, pre


def _add_tokenizer(writer, loaded, vocab_size: int) -> None:
    """Byte-level BPE metadata from the model folder's tokenizer.json, padded to the embedding's rows."""
    vocab, data, pre = tokenizer_vocab(loaded)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[token].get("special") else USER_DEFINED) if token in added else NORMAL
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])])
    tok = loaded.tokenizer
    for setter, token_id in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                             (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id)):
        if token_id is not None:
            setter(int(token_id))
    probe = tok("a").input_ids
    writer.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id)
    if isinstance(getattr(tok, "chat_template", None), str):
        writer.add_chat_template(tok.chat_template)


LOWERING = GgufLowering()
