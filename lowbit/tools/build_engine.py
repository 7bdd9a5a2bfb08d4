"""``lowbit build-engine``: build the TensorRT engine of a ``--target tensorrt`` artifact into it, on the machine
(TensorRT >= 10.7, NVIDIA GPU) it will run on. The build itself is ``kernels.tensorrt.engine``; this adds its
files to the artifact, all or nothing (``format.artifact.add_files``)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.kernels.tensorrt.engine import Limits, engine_files, require_tensorrt


def build_artifact_engine(path: Path, limits: Limits, aot: bool = True) -> dict:
    """``lowbit build-engine``: build the engine of a ``--target tensorrt`` artifact into it (``tensorrt/``: engine,
    build log, timing cache, reused by the next build); returns the manifest's engine record."""
    from lowbit.format.artifact import TENSORRT_CACHE_FILE, TENSORRT_FILE, add_files, read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    io = manifest.get("tensorrt")
    if io is None:
        raise LowbitError(f"artifact '{path}' was compiled for target '{manifest.get('target')}'; build-engine needs "
                          "one compiled with --target tensorrt")
    require_tensorrt()
    cache_file = path / TENSORRT_CACHE_FILE
    files, record = engine_files(path / TENSORRT_FILE, io, limits, cache_file.read_bytes() if cache_file.is_file()
                                 else None, aot)
    add_files(path, files, {"tensorrt": {"engine": record}})
    return record
