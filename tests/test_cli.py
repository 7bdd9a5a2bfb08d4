"""The lowbit command end to end, and every bad input: one line, exit 2, no traceback, nothing left behind."""

import json
import subprocess
import sys

import pytest

from lowbit.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compile_run_eval_inspect(model_dirs, text_file, tmp_path, capsys):
    art = tmp_path / "art"
    code, out, _ = run_cli(capsys, "compile", model_dirs["llama"], "--recipe", "rtn-w4g64", "-o", art, "-q")
    assert code == 0 and out.strip() == str(art)
    code, out, _ = run_cli(capsys, "run", art, "--prompt", "the model reads", "-p", "four bit", "-n", "5", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [d["prompt"] for d in lines] == ["the model reads", "four bit"]
    code, out, _ = run_cli(capsys, "eval", art, "--text", text_file, "--seq-len", "32", "--max-windows", "3",
                           "--json", "-q")
    res = json.loads(out)
    assert code == 0 and res["windows"] == 3 and res["tokens"] == 3 * 31 and res["ppl"] > 1
    code, out, _ = run_cli(capsys, "eval", model_dirs["llama"], "--text", text_file, "--seq-len", "32",
                           "--max-windows", "3", "--json", "-q")
    assert code == 0 and abs(json.loads(out)["ppl"] / res["ppl"] - 1) < 0.2
    code, out, _ = run_cli(capsys, "inspect", art)
    assert code == 0 and "rtn-w4g64" in out and "model.layers.1.mlp.down_proj" in out and "sha256" in out
    code, out, _ = run_cli(capsys, "inspect", art, "--json")
    assert code == 0 and json.loads(out)["manifest"]["recipe"]["bits"] == 4


def _bad(capsys, tmp_path, *args, needle):
    before = set(tmp_path.iterdir())
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before       # no output folder, no temp folder


def test_bad_inputs(model_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(capsys, tmp_path, "compile", tmp_path / "nope", "-o", out, needle="does not exist")
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("hi")
    _bad(capsys, tmp_path, "compile", notmodel, "-o", out, needle="not a transformers model folder")
    weird = tmp_path / "weird"
    weird.mkdir()
    for config, needle in [({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
                            "T5ForConditionalGeneration is an encoder-decoder model"),
                           ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]},
                            "LlavaForConditionalGeneration is a vision-language or sequence-to-sequence model"),
                           ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
                            "MixtralForCausalLM is a mixture-of-experts model"),
                           ({"model_type": "no_such_model", "architectures": ["NoSuchForCausalLM"]},
                            "transformers cannot read the config of NoSuchForCausalLM"),
                           ({"model_type": "llama"}, "has a config.json but no weights")]:
        (weird / "config.json").write_text(json.dumps(config))
        _bad(capsys, tmp_path, "compile", weird, "-o", out, needle=needle)
    _bad(capsys, tmp_path, "compile", model_dirs["llama"], "-r", "rtn-w5", "-o", out, needle="unknown recipe")
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text("bits = = 4\n")
    _bad(capsys, tmp_path, "compile", model_dirs["llama"], "-r", bad_recipe, "-o", out, needle="malformed recipe")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(capsys, tmp_path, "eval", model_dirs["llama"], "--text", empty, "--seq-len", "64", needle="too short")
    _bad(capsys, tmp_path, "eval", model_dirs["llama"], "--text", empty, needle="longer than the model's context")
    short = tmp_path / "short.txt"
    short.write_text("the model reads every weight")
    _bad(capsys, tmp_path, "eval", model_dirs["llama"], "--text", short, "--seq-len", "64", needle="too short")
    _bad(capsys, tmp_path, "eval", model_dirs["llama"], "--text", tmp_path / "none.txt", needle="does not exist")
    _bad(capsys, tmp_path, "compile", model_dirs["llama"], "-t", "tflite", "-o", out, needle="unknown target")


def test_bad_artifacts(model_dirs, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["compile", str(model_dirs["gpt2"]), "-r", "rtn-w8", "-o", str(art), "-q"]) == 0
    capsys.readouterr()
    _bad(capsys, tmp_path, "compile", model_dirs["gpt2"], "-o", art, needle="already exists; pass --force")
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x55
    w.write_bytes(bytes(data))
    _bad(capsys, tmp_path, "run", art, "-p", "hello", needle="weights.safetensors is corrupted")
    _bad(capsys, tmp_path, "eval", art, "--text", model_dirs["gpt2"] / "config.json", needle="corrupted")
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    _bad(capsys, tmp_path, "inspect", art, needle="format version 99; this lowbit reads versions 1 to")
    _bad(capsys, tmp_path, "run", tmp_path, "-p", "x", needle="not a lowbit artifact")


def test_prompt_longer_than_context(model_dirs, tmp_path, capsys):
    art = tmp_path / "a"
    assert main(["compile", str(model_dirs["opt"]), "-r", "rtn-w4g64", "-o", str(art), "-q"]) == 0
    capsys.readouterr()
    _bad(capsys, tmp_path, "run", art, "-p", "the model " * 200, "-n", "8", needle="exceeds the model's context")


def test_console_script_exit_code(tmp_path):
    """The real process: exit status 2 and a single stderr line for a user error."""
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "compile", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_runtime_device_and_dtype(model_dirs, text_file, tmp_path, capsys):
    """--device/--dtype for the torch backend: bf16 on CPU tracks float32; CUDA runs the Triton kernels when a GPU
    is present and is refused with one line when not; ONNX Runtime takes neither."""
    import torch

    import lowbit

    art = tmp_path / "a"
    assert main(["compile", str(model_dirs["llama"]), "-r", "rtn-w4g64", "-o", str(art), "-q"]) == 0
    capsys.readouterr()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 300, (2, 24), generator=gen)
    ref = lowbit.load(art).forward(ids)
    bf16 = lowbit.load(art, dtype="bfloat16").forward(ids)
    assert bf16.dtype == torch.bfloat16
    assert float((bf16.float() - ref).norm() / ref.norm()) < 3e-2
    code, out, _ = run_cli(capsys, "eval", art, "--text", text_file, "--seq-len", "32", "--max-windows", "2",
                           "--dtype", "bfloat16", "--json", "-q")
    assert code == 0 and json.loads(out)["windows"] == 2
    if torch.cuda.is_available():
        y = lowbit.load(art, device="cuda").forward(ids)
        assert y.device.type == "cuda" and y.dtype == torch.float16
        assert float((y.float().cpu() - ref).norm() / ref.norm()) < 1e-2
        code, out, _ = run_cli(capsys, "run", art, "-p", "the model", "-n", "4", "--device", "cuda")
        assert code == 0
        # W8A8 end to end: per-token INT8 activations of fp16 (GPU) and fp32 (CPU) hidden states differ where
        # a value sits near a rounding boundary, so the bound is looser than weight-only's.
        art8 = tmp_path / "a8"
        assert main(["compile", str(model_dirs["llama"]), "-r", "zq-w8a8", "-o", str(art8), "-q"]) == 0
        ref8 = lowbit.load(art8).forward(ids)
        y8 = lowbit.load(art8, device="cuda").forward(ids)
        assert float((y8.float().cpu() - ref8).norm() / ref8.norm()) < 3e-2
    else:
        _bad(capsys, tmp_path, "run", art, "-p", "the model", "--device", "cuda", needle="no CUDA device")
    _bad(capsys, tmp_path, "run", art, "-p", "the model", "--dtype", "float8", needle="unknown --dtype 'float8'")
    _bad(capsys, tmp_path, "eval", art, "--text", text_file, "--device", "tpu", needle="unknown --device 'tpu'")
    _bad(capsys, tmp_path, "run", art, "-p", "the model", "--backend", "ort", "--dtype", "float16",
         needle="backend 'ort' cannot run")


@pytest.mark.parametrize("args,needle", [
    (["eval", "demo", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["eval", "demo", "--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["eval", "demo", "--batch-size", "two"], "--batch-size must be an integer at least 1, got 'two'"),
    (["eval", "demo", "--max-windows", "0"], "--max-windows must be at least 1, got 0"),
    (["eval", "demo", "--max-windows", "-1"], "--max-windows must be at least 1, got -1"),
    (["eval", "demo", "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (["eval", "demo", "--embeddings", "demo", "--max-sentences", "0"], "--max-sentences must be at least 1, got 0"),
    (["compile", "demo", "-o", "x", "--eval", "demo", "--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["compile", "demo", "-o", "x", "--eval-seq-len", "0"], "--eval-seq-len must be at least 2, got 0"),
    (["compile", "demo", "-o", "x", "--calib-samples", "0"], "--calib-samples must be at least 1, got 0"),
    (["compile", "demo", "-o", "x", "--calib-seq-len", "1"], "--calib-seq-len must be at least 2, got 1"),
    (["compile", "demo", "-o", "x", "--seed", "-1"], "--seed must be in 0..2**64-1, got -1"),
    (["compile", "demo", "-o", "x", "--dtype", "int8"], "unknown --dtype 'int8'; valid: auto, float32, float16, bfloat16"),
    (["compile", "demo", "-o", "x", "-t", "hf-awq", "--dtype", "bfloat16"],
     "--target hf-awq stores float16 weights; drop --dtype bfloat16 or pass --dtype float16"),
    (["compile", "demo", "-o", "x", "--lkd-steps", "0"], "lkd_steps=0 (--lkd-steps): must be >= 1"),
    (["compile", "demo", "-o", "x", "--lkd-steps", "many"], "--lkd-steps must be an integer, got 'many'"),
    (["compile", "demo", "-o", "x", "--lkd-lr", "-1"], "lkd_lr=-1.0 (--lkd-lr): must be a finite number >= 0"),
    (["compile", "demo", "-o", "x", "--lkd-lr", "nan"], "lkd_lr=nan (--lkd-lr): must be a finite number >= 0"),
    (["compile", "demo", "-o", "x", "--lkd-batch", "0"], "lkd_batch=0 (--lkd-batch): must be >= 1"),
    (["compile", "demo", "-o", "x", "--lkd-samples", "-2"], "lkd_samples=-2 (--lkd-samples): must be >= 1"),
    (["compile", "demo", "-o", "x", "--lkd-seq-len", "1"], "lkd_seq_len=1 (--lkd-seq-len): must be >= 2"),
    (["compile", "demo", "-o", "x", "--lkd-data", "web"], "lkd_data='web' (--lkd-data): valid: calib, random"),
    (["compile", "demo", "-o", "x", "-t", "onnx", "--onnx-accuracy-level", "9"],
     "--onnx-accuracy-level 9: valid 0, 1, 2, 3, 4"),
    (["compile", "demo", "-o", "x", "-t", "onnx", "--onnx-accuracy-level", "high"],
     "--onnx-accuracy-level must be an integer, got 'high'"),
    (["compile", "demo", "-o", "x", "--onnx-accuracy-level", "4"],
     "--onnx-accuracy-level (onnx_accuracy_level) applies to --target onnx, not torch"),
    (["run", "art", "-p", "x", "--seed", "many"], "--seed must be an integer in 0..2**64-1, got 'many'"),
    (["profile", "art", "--new-tokens", "-1"], "--new-tokens must be at least 0, got -1"),
    (["profile", "art", "--iterations", "0"], "--iterations must be at least 1, got 0"),
    (["profile", "art", "--warmup-s", "-1"], "--warmup-s must be a finite number >= 0, got '-1'"),
    (["profile", "art", "--duration-s", "0"], "--duration-s must be a finite number > 0, got '0'"),
    (["profile", "art", "--duration-s", "inf"], "--duration-s must be a finite number > 0, got 'inf'"),
    (["build-engine", "art", "--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["build-engine", "art", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["build-engine", "art", "--max-past", "-5"], "--max-past must be at least 1, got -5"),
])
def test_out_of_range_flags_are_refused_while_parsing(args, needle, tmp_path, capsys):
    _bad(capsys, tmp_path, *args, needle=needle)


@pytest.mark.parametrize("args,needle", [
    (["-n", "-3"], "max_new_tokens (-n) must be an integer at least 1, got -3"),
    (["-n", "0"], "max_new_tokens (-n) must be an integer at least 1, got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--temperature", "0", "--sample"], "temperature must be a finite number > 0 when sampling"),
    (["--temperature", "nan", "--sample"], "temperature must be a finite number > 0 when sampling"),
    (["--top-p", "2"], "top_p (--top-p) must be a number in 0 < top_p <= 1"),
    (["--top-p", "0", "--sample"], "top_p (--top-p) must be a number in 0 < top_p <= 1"),
    (["--top-k", "-5"], "top_k (--top-k) must be an integer at least 0"),
    (["--min-p", "1.5"], "min_p (--min-p) must be a number in 0 <= min_p <= 1"),
    (["--repetition-penalty", "0"], "repetition_penalty (--repetition-penalty) must be a number > 0"),
    (["--presence-penalty", "-3"], "presence_penalty (--presence-penalty) must be a number in -2"),
    (["--frequency-penalty", "inf"], "frequency_penalty (--frequency-penalty) must be a number in -2"),
    (["--stop", ""], "stop (--stop) must be at most 16 non-empty strings"),
    (["--stream", "--json"], "--json prints whole completions; drop --stream"),
])
def test_run_sampling_ranges_are_checked_before_loading(args, needle, tmp_path, capsys):
    # A missing artifact: the range error comes first, so no backend (torch or ONNX Runtime) is ever reached.
    _bad(capsys, tmp_path, "run", tmp_path / "no-artifact", "-p", "x", *args, needle=needle)


def test_check_sampling_edges_and_types():
    from lowbit.errors import LowbitError
    from lowbit.runtime.sampling import GenerationSettings

    def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p):
        GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                           top_p=top_p)

    check_sampling(1, False, 0.0, 0, 1.0)          # greedy: temperature 0 is the usual "greedy"
    check_sampling(1, True, 1e-3, 5, 1e-6)
    for args, needle in [((2.5, False, 1.0, 0, 1.0), "max_new_tokens"), ((True, False, 1.0, 0, 1.0), "max_new_tokens"),
                         ((4, True, float("inf"), 0, 1.0), "temperature"), ((4, False, 1.0, 1.5, 1.0), "top_k"),
                         ((4, True, 1.0, 0, float("nan")), "top_p"), ((4, True, "1", 0, 1.0), "temperature")]:
        with pytest.raises(LowbitError, match=needle):
            check_sampling(*args)


def test_compile_refuses_unusable_output_paths(tmp_path, capsys, monkeypatch):
    """-o is checked before the model is even looked at (the model path here does not exist)."""
    (tmp_path / "file").write_text("x")
    model = tmp_path / "no-model"
    _bad(capsys, tmp_path, "compile", model, "-o", tmp_path / "file", "--force", needle="exists and is not a folder")
    _bad(capsys, tmp_path, "compile", model, "-o", "/proc/x", needle="is under /proc")
    monkeypatch.chdir(tmp_path)
    _bad(capsys, tmp_path, "compile", model, "-o", ".", "--force", needle="'.' is the current folder")


def test_compile_refuses_unreadable_or_custom_code_configs(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    out = tmp_path / "o"
    (folder / "config.json").write_bytes(b'{"model_type": "llama", "name": "\xff\xfe"}')
    _bad(capsys, tmp_path, "compile", folder, "-o", out, needle="config.json: not UTF-8 text (byte 0xff at offset")
    (folder / "config.json").write_text("[1, 2]")
    _bad(capsys, tmp_path, "compile", folder, "-o", out, needle="a transformers config is a JSON object")
    # A folder that ships its own architecture: its Python must not run, and the refusal says why.
    marker = tmp_path / "ran"
    (folder / "configuration_mine.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mine", "architectures": ["MineForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.Mine"}}))
    _bad(capsys, tmp_path, "compile", folder, "-o", out, needle="lowbit does not run a model folder's own code")
    assert not marker.exists()


def test_closed_stdout_pipe_is_quiet(tmp_path):
    """``lowbit ... | head -1``: the reader goes away mid-output; exit 1 with nothing on stderr. The output is made
    far larger than a pipe's buffer so the write really fails."""
    big = ("import sys\nimport lowbit.passes.recipe as r\n"
           "r.BUILTIN = {f'recipe-{i}': r.BUILTIN['fp'] for i in range(100000)}\n")

    def first_line_then_close(code: str):
        p = subprocess.Popen([sys.executable, "-c", big + code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode()
        p.wait(timeout=120)
        return first, p.returncode, err

    first, rc, err = first_line_then_close("from lowbit.cli import main\nsys.exit(main(['recipes']))\n")
    assert first.startswith(b"recipe-0") and rc == 1 and err == "", err
    # Negative control: the same printing outside main dies with the traceback main now prevents.
    _, rc, err = first_line_then_close("from lowbit.cli import _cmd_recipes\n_cmd_recipes(None)\n")
    assert rc != 0 and "BrokenPipeError" in err


def test_target_options_are_typed():
    """Each target's options are one frozen class: keywords and objects build it, ranges are checked once, a
    keyword of another target is refused naming that target, an unknown one is a TypeError as in Python."""
    from lowbit.errors import LowbitError
    from lowbit.lowering.onnx.options import OnnxOptions
    from lowbit.targets import target_options

    assert target_options("onnx", onnx_accuracy_level=4, onnx_fusions=False) == OnnxOptions(4, False, "lowbit")
    assert target_options("onnx", OnnxOptions(exporter="torch.onnx")).exporter == "torch.onnx"
    with pytest.raises(LowbitError, match="applies to --target tensorrt, not onnx"):
        target_options("onnx", trt_precision="float32")
    with pytest.raises(LowbitError, match="takes TensorRTOptions, not OnnxOptions"):
        target_options("tensorrt", OnnxOptions())
    with pytest.raises(LowbitError, match="--onnx-accuracy-level 5: valid"):
        OnnxOptions(accuracy_level=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'onnx_speed'"):
        target_options("onnx", onnx_speed=1)
