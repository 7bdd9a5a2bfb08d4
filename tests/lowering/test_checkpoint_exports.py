"""The hf-awq and compressed-tensors exports: each layer read back (AWQ by an independent unpacking of AutoAWQ's
GEMM layout, compressed-tensors by the compressed-tensors library's own decompressors) equals the torch artifact
of the same recipe bit for bit; whole checkpoints load in transformers; what a format cannot hold is refused."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.cli import main
from lowbit.compiler.pipeline import CalibrationArgs
from lowbit.passes.recipe import load_recipe
from lowbit.passes.settings import Override

from tests.conftest import dequantized_layers, sample_text

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(words: torch.Tensor, order=AWQ_ORDER) -> torch.Tensor:
    """int32 [R, C/8] -> codes [R, C]: nibble i of each word is column ``order[i]`` of its eight."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(u >> (4 * i)) & 15 for i in range(8)], dim=2)        # [R, C/8, 8] by nibble
    out = torch.empty_like(nibbles)
    out[:, :, list(order)] = nibbles
    return out.reshape(words.shape[0], -1)


def read_awq_layer(t: dict, name: str, group: int, order=AWQ_ORDER) -> torch.Tensor:
    codes = unpack_awq(t[f"{name}.qweight"], order)                 # [K, N]
    zeros = unpack_awq(t[f"{name}.qzeros"], order)                  # [G, N]
    scales = t[f"{name}.scales"].float()                            # [G, N]
    g = torch.arange(codes.shape[0]) // group
    return ((codes - zeros[g]).float() * scales[g]).t()


def _calibration(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(6000, 3))
    return CalibrationArgs(str(text), 8, 48)


def _compile_both(model_dir, recipe, target, tmp_path, calib=False):
    kw = dict(quiet=True)
    if calib:
        kw["calib"] = _calibration(tmp_path)
    # fuse=False: the torch artifact keeps one tensor per layer, to compare layer by layer.
    ours = lowbit.compile(str(model_dir), recipe, out=tmp_path / "torch", fuse=False, **kw)
    exp = lowbit.compile(str(model_dir), recipe, out=tmp_path / target, target=target, **kw)
    return dequantized_layers(ours), exp


def _scheme(name, **changes):
    r = load_recipe(name)
    return replace(r, name=f"{name}-test", scheme=replace(r.scheme, **changes))


@pytest.mark.parametrize("recipe,calib", [("rtn-w4g32", False), ("gptq-w4g32-sym", True)])
def test_awq_export_reads_back_bit_exactly(recipe, calib, model_dirs, tmp_path):
    r = _scheme("gptq-w4g64", group_size=32, sym=True) if recipe == "gptq-w4g32-sym" else load_recipe(recipe)
    ref, exp = _compile_both(model_dirs["llama"], r, "hf-awq", tmp_path, calib)
    qc = json.loads((exp / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    t = load_file(str(exp / "model.safetensors"))
    assert len(ref) == 14
    for name, w in ref.items():
        n, k = w.shape
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (k, n // 8)
        assert t[f"{name}.qzeros"].shape == (k // 32, n // 8) and t[f"{name}.scales"].shape == (k // 32, n)
        assert t[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(read_awq_layer(t, name, 32), w), name
    # The control: the same words read in plain nibble order give other weights.
    name = next(iter(ref))
    assert not torch.equal(read_awq_layer(t, name, 32, order=tuple(range(8))), ref[name])
    assert t["model.embed_tokens.weight"].dtype == torch.float16 and (exp / "tokenizer.json").is_file()
    assert len(json.loads((exp / "graph.json").read_text())["layers"]) == 14        # what lowbit inspect lists


def _ct_layer(t: dict, name: str, qc: dict) -> torch.Tensor:
    """One layer decompressed by the compressed-tensors library, with the scheme its config gives the layer."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "lowbit"})
    scheme = next(s for s in config.config_groups.values() if s.targets in (["Linear"], ) or name in s.targets)
    fmt = next(g["format"] for g in qc["config_groups"].values() if g["targets"] == scheme.targets)
    local = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")}
    compressor = BaseCompressor.get_value_from_registry(fmt)
    assert ct is not None and compressor is not None
    return compressor.decompress(local, scheme)["weight"]


CT_CASES = {          # recipe -> (what it tests, group formats expected)
    "rtn-w4g32": ("asymmetric 4-bit: packed zero points", {"pack-quantized"}),
    "rtn-w3g32": ("3-bit: codes crossing 32-bit words", {"pack-quantized"}),
    "rtn-w8": ("asymmetric 8-bit per channel", {"pack-quantized"}),
    "zq-w8a8": ("W8A8: int8 weights, per-token INT8 activations", {"int-quantized"}),
    "mixed": ("INT8 attention, symmetric INT4 MLP, lm_head float", {"pack-quantized"}),
}


@pytest.mark.parametrize("recipe", list(CT_CASES))
def test_compressed_tensors_export_reads_back_bit_exactly(recipe, model_dirs, tmp_path):
    pytest.importorskip("compressed_tensors")
    if recipe == "mixed":
        r = _scheme("rtn-w4g32", sym=True, overrides=(Override("*.self_attn.*", bits=8),))
    else:
        r = _scheme("rtn-w3g64", group_size=32) if recipe == "rtn-w3g32" else load_recipe(recipe)
    ref, exp = _compile_both(model_dirs["llama"], r, "compressed-tensors", tmp_path)
    qc = json.loads((exp / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert {g["format"] for g in qc["config_groups"].values()} == CT_CASES[recipe][1]
    assert qc["ignore"] == ["lm_head"]
    if recipe == "zq-w8a8":
        (group,) = qc["config_groups"].values()
        assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                              "dynamic": True}
    if recipe == "mixed":
        assert len(qc["config_groups"]) == 2
    t = load_file(str(exp / "model.safetensors"))
    assert len(ref) == 14
    for name, w in ref.items():         # the library dequantizes in float16, the scales' dtype: one rounding
        assert torch.equal(_ct_layer(t, name, qc), w.half()), name
    # The control: zero points (or codes) one step off read back as other weights.
    name = next(iter(ref))
    key = next(k for k in (f"{name}.weight_zero_point", f"{name}.weight_packed", f"{name}.weight") if k in t)
    t[key] = t[key] ^ 1
    assert not torch.equal(_ct_layer(t, name, qc), ref[name].half())


def test_compressed_tensors_checkpoint_loads_in_transformers(model_dirs, tmp_path):
    """transformers (with the compressed-tensors package) loads a symmetric export and computes lowbit's logits.
    Asymmetric pack-quantized checkpoints are not loaded here: transformers' loader expects unpacked zero points,
    unlike the format's own compressor and vLLM (llm-compressor issue 1618)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    r = _scheme("rtn-w4g32", sym=True)
    # The same float16 weights on both sides: float16 is what the export stores, and rounding to it first can move
    # a code by one step.
    kw = dict(quiet=True, dtype="float16")
    exp = lowbit.compile(str(model_dirs["llama"]), r, out=tmp_path / "ct", target="compressed-tensors", **kw)
    ours = lowbit.compile(str(model_dirs["llama"]), r, out=tmp_path / "torch", **kw)
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32)
    theirs = model(ids).logits.float()
    mine = lowbit.load(ours, backend="torch", kernels="reference").forward(ids).float()
    assert (theirs - mine).norm() / mine.norm() < 1e-3
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))
    # The control: the float model's logits are further from the export's than that.
    float_model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    assert (float_model(ids).logits - mine).norm() / mine.norm() > 1e-2


def _folding(name: str, **changes):
    """A built-in recipe with AWQ's scales and the rotations folded into the graph first."""
    return replace(_scheme(name, **changes), awq=True, rotate=True)


def test_checkpoint_exports_carry_the_graph_folds(tokenizer, tmp_path):
    """AWQ's scaled norms and the rotated embedding, norms and (untied) head are ordinary weights of the export:
    transformers loads a rotated AWQ compressed-tensors checkpoint of a tied model at the torch artifact's logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    folder = _llama(tmp_path, tokenizer)
    r = _folding("rtn-w4g32", sym=True)
    kw = dict(quiet=True, dtype="float16", calib=_calibration(tmp_path))
    exp = lowbit.compile(str(folder), r, out=tmp_path / "ct", target="compressed-tensors", **kw)
    ours = lowbit.compile(str(folder), r, out=tmp_path / "torch", **kw)
    assert json.loads((exp / "config.json").read_text())["tie_word_embeddings"] is False
    t = load_file(str(exp / "model.safetensors"))
    assert torch.equal(t["model.norm.weight"], torch.ones(64, dtype=torch.float16))     # folded into the head
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    mine = lowbit.load(ours, backend="torch", kernels="reference").forward(ids).float()
    theirs = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32)(ids).logits.float()
    assert (theirs - mine).norm() / mine.norm() < 1e-3
    # The control: the same quantized layers beside the model's own float tensors compute something else.
    float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    own = {k: v.half() for k, v in float_model.state_dict().items() if k.rpartition(".")[0] + ".weight_packed" not in t}
    t.update(own)
    t.pop("lm_head.weight")
    plain = tmp_path / "plain"
    shutil.copytree(exp, plain)
    save_file(t, str(plain / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    theirs = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)(ids).logits.float()
    assert (theirs - mine).norm() / mine.norm() > 1e-2


@pytest.mark.parametrize("target,recipe,needle", [
    ("hf-awq", "rtn-w3g64", "AWQ checkpoints hold 4-bit weights, not 3-bit; --target compressed-tensors can hold it"),
    ("hf-awq", "zq-w8a8", "AWQ is weight-only"),
    ("hf-awq", "rtn-w8", "not 8-bit"),
    ("hf-awq", "rtn-w4g64", "K=160 is not a multiple of group_size 64"),
    ("hf-awq", "zq-w4a16-mixed", "AWQ checkpoints hold 4-bit weights, not 8-bit"),
    ("compressed-tensors", "rtn-w4g64", "K=160 is not a multiple of group_size 64"),
    ("compressed-tensors", "fp", "needs quantized weights"),
    ("hf-gptq", "rtn-w4g64", "--target hf-awq or --target compressed-tensors can hold it"),
    ("gguf", "gptq-w4g64", "GGUF blocks hold symmetric 4 or 8-bit groups of 32 (Q4_0, Q8_0), not w4g64"),
    ("gguf", "fp", "needs quantized weights"),
])
def test_exports_refuse_what_the_format_cannot_hold(target, recipe, needle, model_dirs, tmp_path, capsys):
    code = main(["compile", str(model_dirs["llama"]), "-r", recipe, "-t", target, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_gguf_refuses_another_architecture(model_dirs, tmp_path, capsys):
    code = main(["compile", str(model_dirs["qwen2"]), "-r", "rtn-q4_0", "-t", "gguf", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "writes the llama architecture; this model is 'qwen2'" in err[0], err
    assert not (tmp_path / "o").exists()


def _llama(tmp_path, tokenizer, tied: bool = True):
    """The tiny Llama with norm weights other than ones (what rotations and AWQ fold), tied or not."""
    from tests.conftest import make_model

    model = make_model("llama", seed=1)
    model.config.tie_word_embeddings = tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone().normal_(0, 0.05))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path / ("tied" if tied else "untied")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["tied", "untied", "folded"])
def test_gguf_export_computes_the_torch_artifacts_logits(case, tokenizer, tmp_path, monkeypatch):
    """transformers' own GGUF reader (dequantizing Q4_0 / Q8_0 with the gguf package, undoing llama.cpp's rotary
    row order) gives the torch artifact's logits; the blocks hold the recipe's codes and scales. "folded": AWQ and
    the rotations first, so the rotated head of a tied model is a tensor of its own."""
    import gguf
    from transformers import AutoModelForCausalLM

    from lowbit.lowering import gguf_model, program

    folder = _llama(tmp_path, tokenizer, tied=case != "untied")
    recipe, kw = "rtn-q4_0", dict(quiet=True)
    if case == "folded":
        recipe, kw["calib"] = _folding("rtn-q4_0"), _calibration(tmp_path)
    exp = lowbit.compile(str(folder), recipe, out=tmp_path / "gguf", target="gguf", **kw)
    ours = lowbit.compile(str(folder), recipe, out=tmp_path / "torch", **kw)
    reader = gguf.GGUFReader(str(exp / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["output_norm.weight"] == "F32"
    assert ("output.weight" in types) == (case != "tied") and types.get("output.weight", "Q8_0") == "Q8_0"
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.block_count"] == 2
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    mine = lowbit.load(ours, backend="torch", kernels="reference").forward(ids).float()
    theirs = AutoModelForCausalLM.from_pretrained(exp, gguf_file="model.gguf", dtype=torch.float32)(ids).logits
    assert (theirs.float() - mine).norm() / mine.norm() < 1e-5
    if case == "folded":     # the control: the rotated head dropped for the (rotated) embedding's table
        monkeypatch.setattr(program, "untied_head", lambda graph, config: False)
    else:                    # the control: without llama.cpp's rotary row order the reader's attention is another one
        monkeypatch.setattr(gguf_model, "rope_pairs", lambda heads, rows: torch.arange(rows))
    plain = lowbit.compile(str(folder), recipe, out=tmp_path / "plain", target="gguf", **kw)
    theirs = AutoModelForCausalLM.from_pretrained(plain, gguf_file="model.gguf", dtype=torch.float32)(ids).logits
    assert (theirs.float() - mine).norm() / mine.norm() > 1e-3


def test_gguf_tokenizer_metadata_tokenizes_like_the_model(model_dirs, tokenizer, tmp_path):
    """transformers rebuilds a tokenizer from the GGUF's metadata alone; it gives the model's own token ids."""
    from transformers import AutoTokenizer

    exp = lowbit.compile(str(model_dirs["llama"]), "rtn-q4_0", out=tmp_path / "gguf", target="gguf", quiet=True)
    theirs = AutoTokenizer.from_pretrained(exp, gguf_file="model.gguf")
    text = sample_text(300, 7) + " 12 + 345 = 357, <eos>"
    assert theirs(text).input_ids == tokenizer(text).input_ids
    assert theirs.eos_token_id == tokenizer.eos_token_id


def test_gguf_block_bytes_against_a_reference_dequantizer():
    """One layer's blocks read back by the gguf package's own Q4_0 / Q8_0 dequantizers equal lowbit's weights."""
    import gguf

    from lowbit.format.quantize import QuantSpec, pack_codes, quantize_weight, dequantize_codes
    from lowbit.ir.graph import QuantizedLayer
    from lowbit.lowering.gguf_model import block_bytes

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    for bits, kind in ((4, gguf.GGMLQuantizationType.Q4_0), (8, gguf.GGMLQuantizationType.Q8_0)):
        spec = QuantSpec(bits, 32, sym=True)
        q, s, z = quantize_weight(w, spec)
        layer = QuantizedLayer("l", "wna16_linear", spec, 96, 48, 32, pack_codes(q, bits), s, z, None, "rtn")
        ref = dequantize_codes(q, s, z, 32)
        got = torch.from_numpy(gguf.quants.dequantize(block_bytes(layer), kind))
        assert torch.equal(got, ref)
        swapped = block_bytes(layer).copy()
        swapped[:, [2, 3]] = swapped[:, [3, 2]]                  # the control: two code bytes of the first block
        assert not torch.equal(torch.from_numpy(gguf.quants.dequantize(swapped, kind)), ref)


def test_gguf_refuses_a_tokenizer_it_cannot_write_before_any_pass(model_dirs, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                  data["pre_tokenizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    code = main(["compile", str(folder), "-r", "gptq-q4_0", "-t", "gguf", "-o", str(tmp_path / "o"),
                 "--calib-seq-len", "64"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GPT-2's split; this model's tokenizer.json" in err[0], err
    assert "gptq" not in captured.err.replace("gptq-q4_0", "") and not (tmp_path / "o").exists()
