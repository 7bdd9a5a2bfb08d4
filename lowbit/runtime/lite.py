"""The embeddable runtime without torch: an ONNX artifact run by ONNX Runtime with numpy and the ``tokenizers``
library only (``pip install --no-deps lowbit`` + ``pip install onnxruntime numpy tokenizers jinja2``, the
``lowbit[runtime]`` set; jinja2 for chat templates only). ``lowbit.load(art, backend="ort")`` returns a
``LiteEngine`` where torch is not installed; it has the Engine's ``forward``, ``generate_ids``, ``generate``,
``stream``, ``chat`` and ``embed``, on numpy arrays.

Generation is the Engine's own loop and sampler (``runtime.generation``): the same seed gives the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lowbit.errors import LowbitError
from lowbit.format import artifact
from lowbit.format.signing import open_manifest
from lowbit.runtime.generation import pad_rows
from lowbit.runtime.ort_session import OrtSession
from lowbit.runtime.sampling import GenerationSettings
from lowbit.runtime.text import TextGeneration


class LiteEngine(TextGeneration):
    """A loaded ONNX artifact without torch: ``LiteEngine.load(dir)``; then ``forward``, ``generate``, ``stream``,
    ``chat``, ``embed``."""

    def __init__(self, path: Path, manifest: dict, session: OrtSession):
        self.path, self.manifest, self.runner, self.backend = path, manifest, session, "ort"
        self.task = manifest["source"]["task"]
        generation = artifact.generation_info(path, manifest)
        self.max_positions = int(generation["max_positions"])
        self.tokenizer = self._text = LiteTokenizer.load(artifact.listed_folder(path, manifest, "tokenizer"))
        self._eos = list(generation.get("eos_token_ids") or []) or (
            [self.tokenizer.eos_id] if self.tokenizer is not None and self.tokenizer.eos_id is not None else [])

    @classmethod
    def load(cls, path, provider: str = "auto", threads: int = 0, verify=True, **_) -> "LiteEngine":
        path = Path(path)
        manifest = open_manifest(path, verify)
        return cls(path, manifest, OrtSession(path, manifest, provider, threads))

    def forward(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Logits [B, T, V] of whole sequences (an encoder's last hidden state)."""
        input_ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        return self.runner.full_np(input_ids, mask)

    __call__ = forward

    def _step_np(self, ids, mask, positions, cache):
        logits, cache = self.runner.step_np(ids, mask, positions, cache)
        return logits[:, -1, :], cache

    def generate_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int = 32,
                     **settings) -> np.ndarray:
        """Token ids [B, T + new] from left-padded ids (``runtime.generation``: the Engine's loop and sampler).
        Settings: ``runtime.sampling.GenerationSettings``."""
        s = GenerationSettings.of(max_new_tokens=max_new_tokens, **settings)
        return self._generate_np(np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64), s)

    def embed(self, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Mean-pooled sentence embeddings [S, H] (encoders)."""
        if self.task != "encoder":
            raise LowbitError("embed needs an encoder artifact; this one is a causal LM")
        out = []
        for i in range(0, len(sentences), batch_size):
            ids, mask = self.tokenizer.encode_batch(list(sentences[i:i + batch_size]), side="right")
            hidden = self.forward(ids, mask)
            m = mask[..., None].astype(hidden.dtype)
            out.append((hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9))
        return np.concatenate(out)


class LiteTokenizer:
    """The artifact's ``tokenizer.json`` through the ``tokenizers`` library, with the special tokens of its
    ``tokenizer_config.json``: what the Engine's transformers tokenizer computes for encoding and decoding."""

    def __init__(self, tok, config: dict, folder: Path):
        self.tok, self.folder = tok, folder
        self.eos_id = self._id(config.get("eos_token"))
        pad = self._id(config.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token) -> Optional[int]:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self.tok.token_to_id(token)

    @classmethod
    def load(cls, folder: Path) -> Optional["LiteTokenizer"]:
        from lowbit.runtime.tokenizer_files import tokenizer_config, tokenizer_file

        file = tokenizer_file(folder)
        if file is None:
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(file)), tokenizer_config(folder), folder)

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_batch(self, texts: list[str], side: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask) [B, T], padded on ``side`` to the longest text."""
        return pad_rows(self.encode(texts), self.pad_id, side)

    def decode(self, ids: list) -> str:
        text = self.tok.decode(list(map(int, ids)), skip_special_tokens=True)
        return _clean_up(text) if self.clean_up else text

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        return [self.decode(row) for row in ids]


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
