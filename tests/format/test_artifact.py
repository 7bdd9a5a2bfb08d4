"""Artifact writing is atomic; loading checks format version and hashes."""

import json

import pytest

import lowbit
from lowbit.format import artifact
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def art(model_dirs, tmp_path_factory):
    return lowbit.compile(str(model_dirs["qwen2"]), "rtn-w4g64", out=tmp_path_factory.mktemp("a") / "art", quiet=True)


def test_manifest_contents(art):
    m = artifact.read_manifest(art)
    assert m["format_version"] == artifact.FORMAT_VERSION and m["target"] == "torch"
    assert len(m["source"]["sha256"]) == 64 and m["recipe"]["name"] == "rtn-w4g64"
    assert {"load", "trace", "pass_rtn", "write", "total"} <= set(m["timings"])
    assert {"lowbit", "torch", "transformers", "python"} <= set(m["tools"])
    assert {"weights.safetensors", "graph.json", "config.json", "report.md"} <= set(m["files"])
    assert any(f.startswith("tokenizer/") for f in m["files"])
    assert m["sizes"]["matmul_bytes_after"] < m["sizes"]["matmul_bytes_before"] / 3
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in art.rglob("*"))   # never pickle


def _copy(art, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def test_corrupted_weights_rejected(art, tmp_path):
    bad = _copy(art, tmp_path)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="weights.safetensors is corrupted"):
        lowbit.load(bad)


def test_newer_format_rejected(art, tmp_path):
    bad = _copy(art, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = artifact.FORMAT_VERSION + 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LowbitError, match="this lowbit reads versions 1 to"):
        lowbit.load(bad)


def test_program_versions_read():
    """A program of any version up to this lowbit's loads; a newer one is refused with the reason."""
    from lowbit.format import program

    for version in range(1, program.VERSION + 1):
        program.check_document({"format": program.FORMAT, "version": version, "dtype": "float32", "nodes": []},
                               "program.json")
    for bad in (program.VERSION + 1, 0, None):
        with pytest.raises(LowbitError, match="program format version .* reads versions 1 to"):
            program.check_document({"format": program.FORMAT, "version": bad, "dtype": "float32", "nodes": []},
                                   "program.json")


def test_failed_write_leaves_nothing(tmp_path):
    def fill(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-way")

    with pytest.raises(RuntimeError):
        artifact.write_artifact(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(art, model_dirs):
    with pytest.raises(LowbitError, match="already exists; pass --force"):
        lowbit.compile(str(model_dirs["qwen2"]), "rtn-w8", out=art, quiet=True)
    before = artifact.read_manifest(art)["recipe"]["name"]
    lowbit.compile(str(model_dirs["qwen2"]), "rtn-w8", out=art, force=True, quiet=True)
    assert before == "rtn-w4g64" and artifact.read_manifest(art)["recipe"]["name"] == "rtn-w8"
    assert [p.name for p in art.parent.iterdir()] == ["art"]        # no temp or old folders left
