"""The artifact directory: written atomically, verified on load. JSON and safetensors only, never pickle.

Layout (format version 2)::

    manifest.json        format, source model + hash, recipe, target, timings, metrics, sizes, generation
                         (context length, end-of-sequence ids), file hashes, tools
    program.json         the shipped program: the traced, quantized graph (``format.graph``)
    weights.safetensors  the program's tensors under their transformers names; quantized layers as
                         <layer>.qweight / .scales / .zeros (/ .bias)
    graph.json           the quantized layers: name -> op, bits, group, sym, shapes, method, stats
    config.json          the source model's transformers config
    tokenizer/           the source tokenizer, when it has one
    report.md            human summary

The whole folder is built in a temporary sibling and renamed into place, so a crash never leaves a
half artifact and an existing artifact is only replaced by a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError

FORMAT = "lowbit-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILE = "graph.json"
ONNX_FILE = "onnx/model.onnx"
ONNX_IO_FILE = "onnx/io.json"
TENSORRT_FILE = "tensorrt/model.onnx"
TENSORRT_PLUGINS_FILE = "tensorrt/plugins.json"
TENSORRT_ENGINE_FILE = "tensorrt/model.engine"
TENSORRT_LOG_FILE = "tensorrt/build.log"
TENSORRT_CACHE_FILE = "tensorrt/timing.cache"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    import torch
    import transformers

    from lowbit import __version__

    return {"lowbit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_output_dir(out: Path, force: bool):
    """Fail early, before any work, when the output exists and --force was not given."""
    if out.exists() and not force:
        raise LowbitError(f"output folder '{out}' already exists; pass --force to replace it or choose another -o")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise LowbitError(f"output folder '{out}' exists and is not a lowbit artifact; refusing to replace it")


def write_artifact(out: Path, fill: Callable[[Path], dict], force: bool = False) -> Path:
    """Create the artifact at ``out``: ``fill(tmpdir)`` writes the files and returns the manifest body.

    File hashes, format and tool versions are added here; the folder appears at ``out`` only complete.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        body = fill(tmp)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "tools": tool_versions(),
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_files(path: Path, files: dict[str, bytes], entries: dict) -> dict:
    """Add or replace ``files`` ({relative name: bytes}) in the artifact at ``path`` and merge ``entries`` into its
    manifest, with the new files' hashes; returns the new manifest. Each file, then the manifest, is written
    under a temporary name and renamed into place, so an interrupted call never leaves a half-written file."""
    manifest = read_manifest(path)
    for name, data in files.items():
        dest = path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        manifest["files"][name] = sha256_file(dest)
    for key, value in entries.items():
        manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
    tmp = path / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path / MANIFEST)
    return manifest


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path, verify: bool = True) -> dict:
    """Read and check an artifact's manifest: format, version, and (by default) every file's hash."""
    path = Path(path)
    if not path.is_dir():
        raise LowbitError(f"artifact '{path}' does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise LowbitError(f"'{path}' is not a lowbit artifact (no {MANIFEST}); compile one with 'lowbit compile'") from None
    except json.JSONDecodeError as e:
        raise LowbitError(f"artifact '{path}': {MANIFEST} is corrupted ({e}); recompile it") from None
    if manifest.get("format") != FORMAT:
        raise LowbitError(f"'{path}' is not a lowbit artifact (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LowbitError(f"artifact '{path}' has format version {version}, newer than this lowbit supports "
                          f"({FORMAT_VERSION}); upgrade lowbit or recompile the artifact")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise LowbitError(f"artifact '{path}': file {name} is missing; recompile it")
            if sha256_file(f) != digest:
                raise LowbitError(f"artifact '{path}': file {name} is corrupted (sha256 mismatch); recompile it")
    return manifest


def generation_info(path: Path, manifest: dict) -> dict:
    """Context length and end-of-sequence ids, as the compiler recorded them."""
    if "generation" not in manifest:
        raise LowbitError(f"artifact '{path}' lacks the manifest's generation record; recompile it")
    return manifest["generation"]
