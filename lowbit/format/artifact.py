"""The artifact directory: written atomically, verified on load. JSON and safetensors only, never pickle.

Layout (format version 2)::

    manifest.json        format, source model + hash, recipe, target, timings, metrics, sizes, generation
                         (context length, end-of-sequence ids), file hashes, tools
    program.json         the shipped program: the traced, quantized graph (``format.program``)
    weights.safetensors  the program's tensors under their transformers names; quantized layers as
                         <layer>.qweight / .scales / .zeros (/ .bias)
    graph.json           the quantized layers: name -> op, bits, group, sym, shapes, method, stats
    config.json          the source model's transformers config
    tokenizer/           the source tokenizer, when it has one
    report.md            human summary
    manifest.sig         optional: ``lowbit sign``'s Ed25519 signature of manifest.json

An artifact is untrusted input on load: the manifest must list every file with its sha256 (names confined
to the folder, no links), the readers open only listed files, and every hash is checked first.
On write the whole folder is built in a temporary sibling and moved into place in one step, under a lock
on the output path, so a crash never leaves a half artifact, an existing artifact is only replaced by a
complete one, and only an artifact of lowbit's own holding nothing unlisted is ever replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError

try:
    import fcntl
except ImportError:         # Windows: the lock is the lock file's existence (O_EXCL)
    fcntl = None

FORMAT = "lowbit-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SIGNATURE_FILE = "manifest.sig"        # lowbit sign: an Ed25519 signature of manifest.json's bytes
TASKS = ("causal-lm", "encoder")
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

    from lowbit.version import __version__

    return {"lowbit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_output_dir(out: Path, force: bool):
    """Fail early, before any work, unless ``out`` is free or (with --force) an artifact of lowbit's own that
    holds nothing its manifest does not list."""
    out = Path(out)
    if out.is_symlink():
        raise LowbitError(f"output '{out}' is a symbolic link; give the folder's real path as -o")
    if not out.exists():
        return
    if not force:
        raise LowbitError(f"output folder '{out}' already exists; pass --force to replace it or choose another -o")
    if not out.is_dir():
        raise LowbitError(f"output '{out}' is a file, not an artifact folder; --force replaces only lowbit artifacts")
    if not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise LowbitError(f"output folder '{out}' exists and is not a lowbit artifact; refusing to replace it")
    foreign = foreign_files(out, manifest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise LowbitError(f"output folder '{out}' holds files its manifest does not list ({shown}); --force replaces "
                          "only what lowbit wrote: move them away or choose another -o")


def foreign_files(root: Path, manifest: dict) -> list[str]:
    """Entries under ``root`` that lowbit did not write: files the manifest does not list, links, and folders
    holding none of its files."""
    listed = set(manifest.get("files", {})) | {MANIFEST, SIGNATURE_FILE}
    parents = {str(Path(n).parent) for n in listed}
    parents |= {str(p) for n in parents for p in Path(n).parents}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            entry, p = str(rel / name), Path(dirpath) / name
            if p.is_symlink() or (name in filenames and entry not in listed) or (name in dirnames
                                                                                  and entry not in parents):
                out.append(entry)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink() and str(rel / d) in parents]
    return sorted(out)


@contextmanager
def output_lock(out: Path):
    """Hold the exclusive lock on output path ``out`` (``.<name>.lock`` beside it): a second lowbit writing the
    same path fails at once. Under the lock, temporary folders that killed runs left there are swept."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    busy = (f"another lowbit is writing '{out}' (it holds {lock}); wait for it to finish or choose another -o")
    if fcntl is None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise LowbitError(busy + "; if none is running, delete the lock file") from None
    while fcntl is not None:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LowbitError(busy) from None
        try:    # the file we locked must still be the one at the path (a finishing holder unlinks it)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        _sweep(out)
        yield
    finally:
        if fcntl is None:
            os.close(fd)
            os.unlink(lock)
        else:       # unlinked while held: one that opened the old file finds it is no longer the path's, retries
            os.unlink(lock)
            os.close(fd)


def _sweep(out: Path):
    """Remove the temporary folders of killed writes to ``out``; an old artifact a killed replace had moved
    aside goes back to the path if nothing took its place."""
    for p in sorted(out.parent.glob(f".{glob_escape(out.name)}.old-*")):
        if not out.exists() and p.is_dir() and (p / MANIFEST).is_file():
            os.rename(p, out)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{glob_escape(out.name)}.tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_artifact(out: Path, fill: Callable[[Path], dict], force: bool = False) -> Path:
    """Create the artifact at ``out``: ``fill(tmpdir)`` writes the files and returns the manifest body.

    File hashes, format and tool versions are added here; the folder appears at ``out`` only complete, and an
    artifact it replaces stays at ``out`` until then (one atomic exchange). Takes the output lock unless the
    caller holds it (``writing``)."""
    out = Path(out)
    with output_lock(out) if not _held(out) else nullcontext():
        check_output_dir(out, force)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            body = fill(tmp)
            _umask_modes(tmp)
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "tools": tool_versions(),
                        "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            _move_into_place(tmp, out, force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask_modes(root: Path):
    """The modes a plain mkdir / open would give (mkdtemp makes the folder 0700, safetensors its file 0600), so a
    server running as another user can read the artifact where the user's umask allows it."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


_LOCKS_HELD: set = set()


def _held(out: Path) -> bool:
    return str(Path(out).absolute()) in _LOCKS_HELD


@contextmanager
def writing(out: Path):
    """The output lock on ``out`` for a whole compile: ``write_artifact`` inside it does not lock again."""
    key = str(Path(out).absolute())
    with output_lock(out):
        _LOCKS_HELD.add(key)
        try:
            yield
        finally:
            _LOCKS_HELD.discard(key)


def _move_into_place(tmp: Path, out: Path, replace: bool):
    """``tmp`` becomes ``out``. A new path is claimed without replacing anything that appeared there meanwhile;
    an existing artifact is exchanged with ``tmp`` in one step (``tmp`` then holds the old one, removed by
    the caller), or, where the filesystem cannot exchange, moved aside for the moment of two renames (a kill
    between them leaves it beside the path, and the next write to the path puts it back)."""
    if not replace or not out.exists():
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise LowbitError(f"'{out}' appeared while this compile ran (another program created it); it was left "
                              "alone: choose another -o") from None
        return
    check_output_dir(out, replace)          # still ours, nothing added meanwhile
    if exchange(tmp, out):
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    os.rename(old, tmp)


def add_files(path: Path, files: dict[str, bytes], entries: dict) -> dict:
    """Add or replace ``files`` ({relative name: bytes}) in the artifact at ``path`` and merge ``entries`` into its
    manifest, all or nothing: the new artifact is built beside it (its other files hard-linked, not copied) and
    exchanged with it in one step. Returns the new manifest."""
    path = Path(path)
    for name in files:
        _check_name(name, path)
    with output_lock(path):
        manifest = read_manifest(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            _link_tree(path, tmp)
            os.chmod(tmp, path.stat().st_mode & 0o7777)         # mkdtemp's 0700 would lock other readers out
            for name, data in files.items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.unlink(missing_ok=True)        # a link to the old file: never write through it
                dest.write_bytes(data)
                manifest["files"][name] = sha256_file(dest)
            for key, value in entries.items():
                manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
            (tmp / MANIFEST).unlink(missing_ok=True)
            (tmp / SIGNATURE_FILE).unlink(missing_ok=True)     # it signed the old manifest
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            _move_into_place(tmp, path, True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _link_tree(src: Path, dst: Path):
    for dirpath, _, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            try:
                os.link(Path(dirpath) / name, dst / rel / name, follow_symlinks=False)
            except OSError:
                shutil.copy2(Path(dirpath) / name, dst / rel / name, follow_symlinks=False)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the filesystem lacks it."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def rename_noreplace(src: Path, dst: Path):
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (atomically where the OS can)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(str(dst)) from None
        raise
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(str(dst)) from None
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where unavailable."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _check_name(name, root) -> None:
    """A manifest file name must be a plain relative path inside the artifact: no absolute path, no '..' or '.',
    no empty part, no backslash."""
    parts = name.split("/") if isinstance(name, str) else None
    if not parts or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) \
            or name in (MANIFEST, SIGNATURE_FILE) or "\x00" in name:
        raise LowbitError(f"artifact '{root}': the manifest names file {str(name)[:80]!r}, which is not a plain path "
                          "inside the artifact; refusing it")


def _regular_inside(root: Path, name: str) -> Path:
    """``root/name`` when it is a regular file reached through no symbolic link; LowbitError otherwise."""
    p = root
    for part in name.split("/"):
        p = p / part
        if p.is_symlink():
            raise LowbitError(f"artifact '{root}': {name} is (or lies under) a symbolic link; lowbit reads only the "
                              "artifact's own files")
    if not p.is_file():
        raise LowbitError(f"artifact '{root}': file {name} is missing; recompile it")
    return p


def read_manifest(path, verify: bool = True) -> dict:
    """Read and check an artifact's manifest: format, version, the file list (required, every name confined to
    the folder, no links) and, with ``verify`` (the default), every file's hash."""
    path = Path(path)
    if not path.is_dir():
        raise LowbitError(f"artifact '{path}' does not exist")
    if (path / MANIFEST).is_symlink():
        raise LowbitError(f"artifact '{path}': {MANIFEST} is a symbolic link; refusing it")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"'{path}' is not a lowbit artifact (no {MANIFEST}); compile one with 'lowbit compile'") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LowbitError(f"artifact '{path}': {MANIFEST} is corrupted ({str(e)[:100]}); recompile it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise LowbitError(f"'{path}' is not a lowbit artifact (format={str(fmt)[:40]!r})")
    version = manifest.get("format_version")
    if not (type(version) is int and 1 <= version <= FORMAT_VERSION):
        raise LowbitError(f"artifact '{path}' has format version {str(version)[:20]}; this lowbit reads versions 1 to "
                          f"{FORMAT_VERSION}: upgrade lowbit or recompile the artifact")
    files = manifest.get("files")
    if not (isinstance(files, dict) and files):
        raise LowbitError(f"artifact '{path}': the manifest lists no files and hashes; refusing it (recompile it)")
    for name, digest in files.items():
        _check_name(name, path)
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise LowbitError(f"artifact '{path}': the manifest's hash of {name} is not a sha256 hex digest")
        f = _regular_inside(path, name)
        if verify and sha256_file(f) != digest:
            raise LowbitError(f"artifact '{path}': file {name} is corrupted (sha256 mismatch); recompile it")
    source = manifest.get("source")
    if not (isinstance(source, dict) and source.get("task") in TASKS):
        raise LowbitError(f"artifact '{path}': the manifest's source.task must be one of {', '.join(TASKS)}; recompile")
    if not isinstance(manifest.get("target"), str):
        raise LowbitError(f"artifact '{path}': the manifest names no target; recompile it")
    return manifest


def read_json(file: Path, what: str):
    """A JSON file of an artifact, or one line saying it is not valid UTF-8 JSON (nesting too deep included)."""
    try:
        return json.loads(Path(file).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LowbitError(f"{what} is not valid UTF-8 JSON ({str(e)[:100]}); recompile the artifact") from None


def member(path: Path, manifest: dict, name: str) -> Path:
    """The artifact file ``name``, which the runtime may read only when the manifest lists (and so hashes) it."""
    _check_name(name, path)
    if name not in manifest["files"]:
        raise LowbitError(f"artifact '{path}': {name} is not listed in its manifest; refusing to read it (recompile)")
    return _regular_inside(Path(path), name)


def listed_folder(path: Path, manifest: dict, folder: str) -> Path:
    """The artifact subfolder ``folder``, whose every file a reader may open (ONNX Runtime's external data, a
    tokenizer's files): refused when it holds a file the manifest does not list, or a link."""
    root = Path(path)
    d = root / folder
    if d.is_symlink():
        raise LowbitError(f"artifact '{root}': {folder}/ is a symbolic link; refusing it")
    if d.is_dir():
        for dirpath, dirnames, filenames in os.walk(d):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = p.relative_to(root).as_posix()
                if p.is_symlink() or (name in filenames and rel not in manifest["files"]):
                    raise LowbitError(f"artifact '{root}': {rel} is not listed in its manifest (or is a link); "
                                      "refusing to read the folder")
    return d


def generation_info(path: Path, manifest: dict) -> dict:
    """Context length and end-of-sequence ids, as the compiler recorded them: a positive context no longer than
    the one config.json gives, integer ids."""
    gen = manifest.get("generation")
    if not isinstance(gen, dict):
        raise LowbitError(f"artifact '{path}' lacks the manifest's generation record; recompile it")
    positions, eos = gen.get("max_positions"), gen.get("eos_token_ids") or []
    limit = _config_positions(path, manifest)
    if not (type(positions) is int and 1 <= positions <= (limit or MAX_POSITIONS)):
        raise LowbitError(f"artifact '{path}': generation.max_positions must be an integer in "
                          f"1..{limit or MAX_POSITIONS} (the model's context), not {str(positions)[:20]}")
    if not (isinstance(eos, list) and all(type(i) is int and 0 <= i < 2**31 for i in eos)):
        raise LowbitError(f"artifact '{path}': generation.eos_token_ids must be a list of token ids (integers), not "
                          f"{str(eos)[:40]}")
    return {**gen, "eos_token_ids": eos}


MAX_POSITIONS = 1 << 22


def _config_positions(path: Path, manifest: dict):
    """The context length config.json states, when it states one at its top level."""
    if "config.json" not in manifest["files"]:
        return None
    config = read_json(member(path, manifest, "config.json"), f"artifact '{path}': config.json")
    value = next((config[k] for k in ("max_position_embeddings", "n_positions") if isinstance(config, dict)
                  and type(config.get(k)) is int), None)
    return value if value and value > 0 else None
