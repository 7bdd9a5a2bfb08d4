"""An artifact's tokenizer files, read as data: ``tokenizer.json`` (the tokenizers library's format) and the
special tokens of ``tokenizer_config.json``. Never a tokenizer that exists only as the model's own code
(``auto_map``): lowbit runs no code an artifact ships. No torch here (the torch-free runtime uses it too)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.format.artifact import read_json


def tokenizer_config(folder: Path) -> dict:
    """``folder/tokenizer_config.json`` ({} when absent), refused when malformed or when it names a file
    outside ``folder``."""
    file = folder / "tokenizer_config.json"
    config = read_json(file, str(file)) if file.is_file() else {}
    if not isinstance(config, dict):
        raise LowbitError(f"{file} is not a JSON object; recompile the artifact")
    for key, value in config.items():
        if key.endswith("_file") and value is not None and (not isinstance(value, str) or Path(value).name != value):
            raise LowbitError(f"{file}: {key} names {str(value)[:60]!r}, outside the tokenizer's folder; refusing it")
    return config


def tokenizer_file(folder: Path) -> Optional[Path]:
    """``folder/tokenizer.json``, or None when ``folder`` holds no tokenizer; refuses a tokenizer that exists
    only as code (an ``auto_map`` without tokenizer.json)."""
    if not folder.is_dir():
        return None
    config = tokenizer_config(folder)
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    if "auto_map" in config:
        raise LowbitError(f"the tokenizer in '{folder}' exists only as the model's own Python code (auto_map, no "
                          "tokenizer.json); lowbit never runs an artifact's code: recompile from a model whose "
                          "tokenizer has a tokenizer.json")
    return None
