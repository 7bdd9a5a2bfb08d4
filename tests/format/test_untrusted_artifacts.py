"""Artifacts are untrusted input: a crafted one is refused with one line (LowbitError), never runs anything but
the operator table, never reads or writes outside its folder. Each case is one a hostile user tried."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.format import artifact, op_table


@pytest.fixture(scope="module")
def art(model_dirs, tmp_path_factory):
    return lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path_factory.mktemp("u") / "art", quiet=True)


def copy_of(art, tmp_path, name="copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(art, dst)
    return dst


def rehash(path: Path) -> None:
    """What an attacker does after editing files: recompute the manifest's hashes."""
    m = json.loads((path / "manifest.json").read_text())
    m["files"] = {k: hashlib.sha256((path / k).read_bytes()).hexdigest() for k in m["files"] if (path / k).is_file()}
    (path / "manifest.json").write_text(json.dumps(m))


def edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def edit_program(path: Path, fn) -> None:
    doc = json.loads((path / "program.json").read_text())
    fn(doc)
    (path / "program.json").write_text(json.dumps(doc))
    rehash(path)


def ids():
    return torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(0))


# ---- the file-writing payload ---------------------------------------------------------------------------------
def add_file_write(doc: dict, target: Path) -> None:
    """aten::from_file(target, shared=True) + aten::copy_ of 16 'A's into it, ahead of the output: the payload that
    wrote any file the user could write."""
    payload = [
        {"op": "call", "name": "evil_map", "target": "aten::from_file.default",
         "args": {"list": [str(target)]}, "kwargs": {"shared": True, "size": 16, "dtype": {"dtype": "uint8"}}},
        {"op": "call", "name": "evil_src", "target": "aten::full.default",
         "args": {"list": [{"list": [16]}, 65]}, "kwargs": {"dtype": {"dtype": "uint8"}}},
        {"op": "call", "name": "evil_copy", "target": "aten::copy_.default",
         "args": {"list": [{"node": "evil_map"}, {"node": "evil_src"}]}, "kwargs": {}},
    ]
    doc["nodes"][-1:-1] = payload


def naive_run(path: Path) -> None:
    """A loader without the operator table (what lowbit was): resolve every target through torch.ops and run the
    graph. Used only as the negative control that proves the payload really writes."""
    import torch.fx as fx
    from safetensors.torch import load_file

    doc = json.loads((path / "program.json").read_text())
    tensors = load_file(str(path / "weights.safetensors"))
    root, g, env = torch.nn.Module(), fx.Graph(), {}

    def val(v):
        if isinstance(v, dict):
            (tag, x), = v.items()
            return {"node": lambda: env[x], "list": lambda: [val(i) for i in x], "tuple": lambda: tuple(val(i) for i in x),
                    "dtype": lambda: getattr(torch, x), "device": lambda: torch.device("cpu"),
                    "float": lambda: float(x), "layout": lambda: getattr(torch, x),
                    "memory_format": lambda: getattr(torch, x)}[tag]()
        return v

    for i, (k, t) in enumerate(tensors.items()):
        root.register_buffer(f"c{i}", t)
    names = {k: f"c{i}" for i, k in enumerate(tensors)}
    for nd in doc["nodes"]:
        if nd["op"] == "placeholder":
            env[nd["name"]] = g.placeholder(nd["name"])
        elif nd["op"] == "get_attr":
            env[nd["name"]] = g.get_attr(names[nd["tensor"]])
        elif nd["op"] == "call":
            if "::" in nd["target"]:
                ns, rest = nd["target"].split("::")
                op, _, ov = rest.rpartition(".")
                fn = getattr(getattr(getattr(torch.ops, ns), op), ov)
            else:
                fn = op_table.PY_FUNCTIONS[nd["target"]]
            env[nd["name"]] = g.call_function(fn, val({"tuple": nd["args"]["list"]}),
                                              {k: val(v) for k, v in nd["kwargs"].items()})
        else:
            g.output(val(nd["args"]))
    gm = fx.GraphModule(root, g)
    x = ids()
    gm(x, torch.ones_like(x), torch.arange(6)[None], *[torch.empty(1, 2, 0, 16)] * 4)


def test_file_writing_program_is_refused(art, tmp_path):
    victim = tmp_path / "victim.pth"
    victim.write_bytes(b"\0" * 16)
    bad = copy_of(art, tmp_path)
    edit_program(bad, lambda doc: add_file_write(doc, victim))
    with pytest.raises(LowbitError, match="aten::from_file.default.*not in lowbit's operator table"):
        lowbit.load(bad)
    assert victim.read_bytes() == b"\0" * 16
    from lowbit.cli import main

    for cmd in (["run", str(bad), "-p", "the model"], ["eval", str(bad), "--max-windows", "1"],
                ["profile", str(bad), "--iterations", "1", "--warmup-s", "0"]):
        assert main(cmd) == 2
    assert victim.read_bytes() == b"\0" * 16


def test_file_writing_payload_writes_without_the_table(art, tmp_path):
    """Negative control: the same payload run by a loader without the table writes the file."""
    victim = tmp_path / "victim.pth"
    victim.write_bytes(b"\0" * 16)
    bad = copy_of(art, tmp_path)
    edit_program(bad, lambda doc: add_file_write(doc, victim))
    naive_run(bad)
    assert victim.read_bytes() == b"A" * 16


def test_in_place_write_is_refused_even_alone(art, tmp_path):
    bad = copy_of(art, tmp_path)

    def inplace(doc):
        first = next(n for n in doc["nodes"] if n["op"] == "get_attr")
        doc["nodes"][-1:-1] = [{"op": "call", "name": "w", "target": "aten::mul_.Tensor",
                                "args": {"list": [{"node": first["name"]}, 0]}, "kwargs": {}}]

    edit_program(bad, inplace)
    with pytest.raises(LowbitError, match="not in lowbit's operator table"):
        lowbit.load(bad)


def test_operator_table_is_closed_and_pure():
    """Every table entry exists in this torch with the table's schema, writes none of its arguments, and none is
    an I/O or uninitialized-memory operator."""
    from lowbit import ops  # noqa: F401

    for name, text in op_table.SCHEMAS.items():
        fn = op_table.resolve(name, op_table.TABLE_VERSION, "test")
        assert str(fn._schema) == text, name
        assert not fn._schema.is_mutable, name
        assert not any(bad in name for bad in ("from_file", "save", "load", "empty", "_local_scalar", "copy_")), name
    with pytest.raises(LowbitError, match="needs operator table"):
        op_table.resolve("aten::add.Tensor", op_table.TABLE_VERSION + 1, "test")
    with pytest.raises(LowbitError, match="which operator table 2 added"):
        op_table.resolve("lowbit::rotate.default", 1, "test")
    assert op_table.needed(["aten::add.Tensor"]) == 1 and op_table.needed(["lowbit::rotate.default"]) == 2


def test_argument_schemas_checked():
    check = op_table.check_call
    check("aten::add.Tensor", [{"node": "a"}, {"node": "b"}], {"alpha": 2}, "p")
    for args, kwargs in (([{"node": "a"}], {}),                                   # missing
                         ([{"node": "a"}, {"node": "b"}, 1], {}),                 # too many positional
                         ([{"node": "a"}, {"node": "b"}], {"beta": 1}),           # unknown keyword
                         ([{"node": "a"}, "text"], {}),                           # a string for a tensor
                         ([{"node": "a"}, {"node": "b"}], {"alpha": {"dtype": "float32"}})):
        with pytest.raises(LowbitError):
            check("aten::add.Tensor", args, kwargs, "p")
    check("lowbit::act_mul.default", [{"node": "y"}, "silu"], {}, "p")
    with pytest.raises(LowbitError, match="one of silu, gelu, gelu_tanh"):
        check("lowbit::act_mul.default", [{"node": "y"}, "../../etc/passwd"], {}, "p")
    with pytest.raises(LowbitError, match="size values and numbers only"):
        check("operator.getitem", [-1, 0], {}, "p")


def test_programs_from_before_the_table_still_load(art, tmp_path):
    """Older compilers left an in-place detach after each lifted constant: read as its input, nothing runs."""
    old = copy_of(art, tmp_path)

    def add_detach(doc):
        doc.pop("op_table")
        i, const = next((i, n) for i, n in enumerate(doc["nodes"]) if n["op"] == "get_attr")
        doc["nodes"].insert(i + 1, {"op": "call", "name": "detach_", "target": "aten::detach_.default",
                                    "args": {"list": [{"node": const["name"]}]}, "kwargs": {}})

    edit_program(old, add_detach)
    torch.testing.assert_close(lowbit.load(old).forward(ids()), lowbit.load(art).forward(ids()))


def test_program_and_weights_bit_width_mismatch(art, tmp_path):
    bad = copy_of(art, tmp_path)

    def three_bits(doc):
        n = next(n for n in doc["nodes"] if n.get("target") == "lowbit::wna16_linear.default")
        n["args"]["list"][5] = 3

    edit_program(bad, three_bits)
    with pytest.raises(LowbitError, match="codes are uint8 .* but 3-bit codes"):
        lowbit.load(bad)


def test_every_architecture_loads_under_the_table(model_dirs, tmp_path):
    """Falcon's traced MLP adds in place (add_): the compiler writes it out of place, and the program runs."""
    d = tmp_path / "falcon"
    from tests.conftest import make_model

    make_model("falcon").save_pretrained(d)
    out = lowbit.compile(str(d), "fp", out=tmp_path / "art", quiet=True)
    doc = json.loads((out / "program.json").read_text())
    assert all(n["target"] in op_table.SCHEMAS or n["target"] in op_table.PY_FUNCTIONS
               for n in doc["nodes"] if n["op"] == "call")
    assert doc["op_table"] == 1                   # no operator newer than table 1: older readers load it
    lowbit.load(out).forward(ids())


# ---- integrity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no files key", "weights unlisted", "empty files"])
def test_integrity_cannot_be_switched_off_from_inside(art, tmp_path, case):
    bad = copy_of(art, tmp_path)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    edit = {"no files key": lambda m: m.pop("files"), "empty files": lambda m: m.update(files={}),
            "weights unlisted": lambda m: m["files"].pop("weights.safetensors")}[case]
    edit_manifest(bad, edit)
    with pytest.raises(LowbitError, match="lists no files|not listed in its manifest"):
        lowbit.load(bad)


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "a/../weights.safetensors",
                                  "manifest.json", "x\\..\\y", ""])
def test_file_names_confined(art, tmp_path, name):
    bad = copy_of(art, tmp_path)
    edit_manifest(bad, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(LowbitError, match="not a plain path inside the artifact"):
        lowbit.load(bad)


def test_symlinked_weights_refused(art, tmp_path):
    other = copy_of(art, tmp_path, "other")
    bad = copy_of(art, tmp_path)
    (bad / "weights.safetensors").unlink()
    (bad / "weights.safetensors").symlink_to(other / "weights.safetensors")
    rehash(bad)
    with pytest.raises(LowbitError, match="symbolic link"):
        lowbit.load(bad)


def test_onnx_file_outside_the_artifact_refused(model_dirs, tmp_path):
    out = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", target="onnx", out=tmp_path / "o", quiet=True)
    edit_manifest(out, lambda m: m["onnx"].update(file="../../other/model.onnx"))
    with pytest.raises(LowbitError, match="not a plain path inside the artifact"):
        lowbit.load(out)
    edit_manifest(out, lambda m: m["onnx"].update(file="model.onnx"))
    (out / "onnx" / "extra.data").write_bytes(b"\0" * 64)     # external data ONNX Runtime would open, unhashed
    with pytest.raises(LowbitError, match="onnx/extra.data is not listed"):
        lowbit.load(out)


@pytest.mark.parametrize("field,value,match", [
    ("format_version", -7, "reads versions 1 to"), ("format_version", "2", "reads versions 1 to"),
    ("max_positions", 100000, "max_positions must be an integer in 1..256"),
    ("max_positions", "long", "max_positions must be"), ("eos", ["0"], "eos_token_ids must be a list"),
    ("source", None, "source.task must be one of")])
def test_manifest_fields_validated(art, tmp_path, field, value, match):
    bad = copy_of(art, tmp_path)

    def edit(m):
        if field == "max_positions":
            m["generation"]["max_positions"] = value
        elif field == "eos":
            m["generation"]["eos_token_ids"] = value
        elif value is None:
            m.pop(field)
        else:
            m[field] = value

    edit_manifest(bad, edit)
    with pytest.raises(LowbitError, match=match):
        lowbit.load(bad)


def test_tensorrt_engine_must_be_hashed(tmp_path):
    from lowbit.runtime.tensorrt_runner import TensorRTRunner

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "model.engine").write_bytes(b"not an engine")
    with pytest.raises(LowbitError, match="model.engine is not listed in its manifest"):
        TensorRTRunner.open(tmp_path, {"tensorrt": {"precision": "float16"}, "files": {}})


def test_add_files_is_all_or_nothing(art, tmp_path, monkeypatch):
    target = copy_of(art, tmp_path)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    real = artifact.sha256_file
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(artifact, "sha256_file", failing)
    with pytest.raises(OSError, match="disk full"):
        artifact.add_files(target, {"tensorrt/model.engine": b"e" * 10, "tensorrt/build.log": b"log"}, {"x": 1})
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]       # no temporary folder left
    monkeypatch.setattr(artifact, "sha256_file", real)
    m = artifact.add_files(target, {"tensorrt/model.engine": b"e" * 10}, {"tensorrt": {"engine": {"bytes": 10}}})
    assert artifact.read_manifest(target)["files"]["tensorrt/model.engine"] == m["files"]["tensorrt/model.engine"]


# ---- tokenizers ---------------------------------------------------------------------------------------------
def test_tokenizer_remote_code_refused(art, tmp_path):
    bad = copy_of(art, tmp_path)
    tok = bad / "tokenizer"
    (tok / "tokenizer.json").unlink()
    marker = tmp_path / "ran"
    (tok / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    edit_manifest(bad, lambda m: m["files"].update({"tokenizer/evil_tokenizer.py": "0" * 64}))
    rehash(bad)
    with pytest.raises(LowbitError, match="exists only as the model's own Python code"):
        lowbit.load(bad)
    assert not marker.exists()


def test_tokenizer_config_naming_outside_files_refused(art, tmp_path):
    bad = copy_of(art, tmp_path)
    tok = bad / "tokenizer"
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = "/etc/passwd"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    rehash(bad)
    with pytest.raises(LowbitError, match="outside the tokenizer's folder"):
        lowbit.load(bad)


# ---- signing ------------------------------------------------------------------------------------------------
def test_signed_artifact_verifies_and_tampering_is_caught(art, tmp_path):
    pytest.importorskip("cryptography")
    from lowbit.format import signing

    signed = copy_of(art, tmp_path)
    private, public = signing.keygen(tmp_path / "me")
    _, other = signing.keygen(tmp_path / "other")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    signing.sign(signed, private)
    assert lowbit.load(signed, verify=str(public)).forward(ids()).shape[-1] > 0
    with pytest.raises(LowbitError, match="signature does not match"):
        lowbit.load(signed, verify=other)
    edit_manifest(signed, lambda m: m.update(recipe={**m["recipe"], "name": "forged"}))
    with pytest.raises(LowbitError, match="signature does not match"):
        lowbit.load(signed, verify=public)
    unsigned = copy_of(art, tmp_path, "unsigned")
    with pytest.raises(LowbitError, match="not signed"):
        lowbit.load(unsigned, verify=public)
    with pytest.raises(LowbitError, match="already exists"):
        signing.keygen(tmp_path / "me")


# ---- writing never destroys what lowbit did not write -------------------------------------------------------
def test_force_refuses_a_folder_with_foreign_files(art, model_dirs, tmp_path):
    photos = tmp_path / "album"
    (photos / "photos").mkdir(parents=True)
    (photos / "photos" / "cat.jpg").write_bytes(b"meow")
    (photos / "manifest.json").write_text("{}")
    with pytest.raises(LowbitError, match="not a lowbit artifact"):
        lowbit.compile(str(model_dirs["llama"]), "fp", out=photos, force=True, quiet=True)
    assert (photos / "photos" / "cat.jpg").read_bytes() == b"meow"

    mine = copy_of(art, tmp_path)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match=r"holds files its manifest does not list \(notes.txt\)"):
        lowbit.compile(str(model_dirs["llama"]), "fp", out=mine, force=True, quiet=True)
    assert (mine / "notes.txt").read_text() == "mine"
    (mine / "notes.txt").unlink()
    lowbit.compile(str(model_dirs["llama"]), "fp", out=mine, force=True, quiet=True)     # ours alone: replaced
    assert artifact.read_manifest(mine)["recipe"]["name"] == "fp"
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in [mine, *mine.rglob("*")] if p.is_file()} == {0o666 & ~umask}
    assert mine.stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["album", "copy"]               # nothing left beside it


def test_folder_created_during_compile_is_left_alone(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_fill = artifact.write_artifact

    def racing(path, fill, force=False):
        def fill_and_race(tmp):
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
            return fill(tmp)
        return real_fill(path, fill_and_race, force)

    monkeypatch.setattr(artifact, "write_artifact", racing)
    with pytest.raises(LowbitError, match="appeared while this compile ran"):
        lowbit.compile(str(model_dirs["llama"]), "fp", out=out, quiet=True)
    assert (out / "theirs.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_writer_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with artifact.writing(out):
        with pytest.raises(LowbitError, match="another lowbit is writing"):
            with artifact.output_lock(out):
                pass
    with artifact.output_lock(out):          # released: free again, and the lock file is gone after
        pass
    assert list(tmp_path.iterdir()) == []


def test_concurrent_compiles_into_one_output(model_dirs, tmp_path):
    """Two processes: the second fails at once with the lock's line; the first's artifact is intact."""
    import subprocess
    import sys

    out = tmp_path / "out"
    with artifact.writing(out):         # stands for a first compile in progress
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "compile", str(model_dirs["llama"]), "-r", "fp",
                            "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "another lowbit is writing" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_killed_replace_is_swept_and_restored(art, tmp_path):
    out = tmp_path / "out"
    old = copy_of(art, tmp_path, f".{out.name}.old-4242")      # a kill between the fallback's two renames
    stale = tmp_path / f".{out.name}.tmp-x1y2"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    with artifact.output_lock(out):
        pass
    assert artifact.read_manifest(out) and not old.exists() and not stale.exists()


def test_replace_without_exchange_falls_back(art, model_dirs, tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two paths, the old artifact is moved aside for two renames."""
    monkeypatch.setattr(artifact, "exchange", lambda a, b: False)
    out = copy_of(art, tmp_path)
    lowbit.compile(str(model_dirs["llama"]), "fp", out=out, force=True, quiet=True)
    assert artifact.read_manifest(out)["recipe"]["name"] == "fp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_exchange_swaps_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not artifact.exchange(a, b):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE (the fallback is tested above)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(FileExistsError):
        artifact.rename_noreplace(a, b)


# ---- fuzz ---------------------------------------------------------------------------------------------------
DANGEROUS = ["aten::from_file.default", "aten::copy_.default", "aten::empty.memory_format", "builtins.eval",
             "os.system", "aten::add_.Tensor", "prims::view_of.default", "torch.load", "operator.attrgetter"]
WEIRD = [None, True, -1, 0, 2**70, 1.5, float("inf"), "x", "../../etc/passwd", [], {}, {"node": "nope"},
         {"dtype": "no_such"}, {"dtype": "empty"}, {"list": 5}, {"tuple": [{"node": "input_ids"}]}, {"float": "1e400"},
         {"evil": 1}, {"device": "cuda"}, [[[[[]]]]]]


def _mutate_program(doc: dict, rng) -> None:
    nodes = doc.get("nodes")
    if not (isinstance(nodes, list) and nodes and isinstance(nodes[0], dict)):
        return
    i = rng.randrange(len(nodes))
    kind = rng.randrange(8)
    if not isinstance(nodes[i], dict):
        return
    if kind == 0:
        nodes[i]["target"] = rng.choice(DANGEROUS + list(op_table.SCHEMAS)[:20])
    elif kind == 1 and isinstance(nodes[i].get("args"), dict) and isinstance(nodes[i]["args"].get("list"), list) \
            and nodes[i]["args"]["list"]:
        args = nodes[i]["args"]["list"]
        args[rng.randrange(len(args))] = rng.choice(WEIRD)
    elif kind == 2 and nodes[i]:
        nodes[i].pop(rng.choice(list(nodes[i])))
    elif kind == 3:
        nodes.insert(rng.randrange(len(nodes)), dict(nodes[i]))
    elif kind == 4:
        del nodes[i]
    elif kind == 5:
        nodes[i][rng.choice(["op", "name", "tensor", "kwargs"])] = rng.choice(WEIRD)
    elif kind == 6:
        doc[rng.choice(["version", "op_table", "dtype", "task", "kv", "nodes", "format"])] = rng.choice(WEIRD)
    else:
        j = rng.randrange(len(nodes))
        nodes[i], nodes[j] = nodes[j], nodes[i]


def _mutate_manifest(m: dict, rng) -> None:
    kind = rng.randrange(6)
    keys = list(m)
    if not isinstance(m.get("files"), dict):
        return
    if kind == 0:
        m.pop(rng.choice(keys))
    elif kind == 1:
        m[rng.choice(keys)] = rng.choice(WEIRD)
    elif kind == 2 and isinstance(m.get("generation"), dict):
        m["generation"][rng.choice(["max_positions", "eos_token_ids"])] = rng.choice(WEIRD)
    elif kind == 3:
        m["files"][rng.choice(["../x", "/etc/passwd", "tokenizer/../../x", "program.json"])] = rng.choice(
            ["0" * 64, "zz", 5])
    elif kind == 4 and isinstance(m.get("source"), dict):
        m["source"][rng.choice(["task", "model_type", "path"])] = rng.choice(WEIRD)
    else:
        m["target"] = rng.choice(["onnx", "tensorrt", "hf-gptq", "nope", 3, None])


def _tree(root: Path) -> set:
    return {str(p) for p in root.rglob("*")}


CASES = 400


def test_fuzzed_artifacts_refuse_cleanly(art, tmp_path):
    """Seeded, bounded: CASES mutations of a real artifact's program and manifest (hashes recomputed, so the checks
    behind integrity are reached). Each load and forward ends in a LowbitError or a finished run; a run whose
    program and weights are untouched gives the unchanged output; no file appears outside the artifact."""
    import random

    rng = random.Random(20261206)
    x = ids()
    want = lowbit.load(art).forward(x)
    work = tmp_path / "work"
    outcomes = {"refused": 0, "ran": 0}
    cwd_before = _tree(Path.cwd()) if Path.cwd() != Path("/") else set()
    for case in range(CASES):
        bad = work / f"c{case}"
        shutil.copytree(art, bad)
        program_edited = case % 2 == 0
        if program_edited:
            doc = json.loads((bad / "program.json").read_text())
            for _ in range(rng.randint(1, 3)):
                _mutate_program(doc, rng)
            (bad / "program.json").write_text(json.dumps(doc))
            rehash(bad)
        else:
            m = json.loads((bad / "manifest.json").read_text())
            _mutate_manifest(m, rng)
            (bad / "manifest.json").write_text(json.dumps(m))
        before = _tree(tmp_path)
        try:
            got = lowbit.load(bad).forward(x)
        except LowbitError as e:
            assert "\n" not in str(e), str(e)
            outcomes["refused"] += 1
        else:
            outcomes["ran"] += 1
            if not program_edited:
                torch.testing.assert_close(got, want)
        assert _tree(tmp_path) == before, f"case {case} wrote files"
        shutil.rmtree(bad)
    assert outcomes["refused"] > 80 and outcomes["ran"] > 5, outcomes
    if cwd_before:
        assert _tree(Path.cwd()) == cwd_before
