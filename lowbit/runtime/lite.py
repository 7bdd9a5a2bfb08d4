"""The embeddable runtime without torch: an ONNX artifact run by ONNX Runtime with numpy and the ``tokenizers``
library only (``pip install --no-deps lowbit`` + ``pip install onnxruntime numpy tokenizers``, the
``lowbit[runtime]`` set). ``lowbit.load(art, backend="ort")`` returns a ``LiteEngine`` where torch is not
installed; it has the Engine's ``forward``, ``generate_ids``, ``generate`` and ``embed`` on numpy arrays.

Generation is the Engine's own loop and sampler (``runtime.generation``): the same seed gives the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import generation
from lowbit.format import artifact
from lowbit.format.signing import open_manifest
from lowbit.runtime.ort_session import OrtSession


class LiteEngine:
    """A loaded ONNX artifact without torch: ``LiteEngine.load(dir)``; then ``forward``, ``generate``, ``embed``."""

    def __init__(self, path: Path, manifest: dict, session: OrtSession):
        self.path, self.manifest, self.runner, self.backend = path, manifest, session, "ort"
        self.task = manifest["source"]["task"]
        generation = artifact.generation_info(path, manifest)
        self.max_positions = int(generation["max_positions"])
        self.tokenizer = LiteTokenizer.load(artifact.listed_folder(path, manifest, "tokenizer"))
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

    def generate_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: Optional[int] = None, stop_at_eos: bool = True) -> np.ndarray:
        """Token ids [B, T + new] from left-padded ids (``runtime.generation``: the Engine's loop and sampler)."""
        if self.task != "causal-lm":
            raise LowbitError("generate needs a causal LM artifact; this one is an encoder")

        def step(ids, mask, positions, cache):
            logits, cache = self.runner.step_np(ids, mask, positions, cache)
            return logits[:, -1, :], cache

        return generation.generate(step, self.runner.start, input_ids, attention_mask, max_new_tokens,
                                   self.max_positions, self._eos, do_sample, temperature, top_k, top_p, seed,
                                   stop_at_eos)

    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 32, **kw) -> Union[str, list[str]]:
        """Text continuations (only the new text) for one prompt or a batch of prompts."""
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        if self.tokenizer is None:
            raise LowbitError(f"artifact '{self.path}' has no tokenizer.json; use generate_ids() with token ids")
        ids, mask = self.tokenizer.encode_batch(batch)
        if ids.shape[1] == 0:
            raise LowbitError("empty prompt; give some text to continue")
        out = self.generate_ids(ids, mask, max_new_tokens, **kw)
        texts = self.tokenizer.decode_batch(out[:, ids.shape[1]:])
        return texts[0] if single else texts

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

    def __init__(self, tok, config: dict):
        self.tok = tok
        self.eos_id = self._id(config.get("eos_token"))
        pad = self._id(config.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))

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

        return cls(Tokenizer.from_file(str(file)), tokenizer_config(folder))

    def encode_batch(self, texts: list[str], side: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask) [B, T], padded on ``side`` to the longest text."""
        enc = [self.tok.encode(t) for t in texts]
        width = max(len(e.ids) for e in enc)
        ids = np.full((len(enc), width), self.pad_id, np.int64)
        mask = np.zeros((len(enc), width), np.int64)
        for row, e in enumerate(enc):
            span = slice(width - len(e.ids), width) if side == "left" else slice(0, len(e.ids))
            ids[row, span], mask[row, span] = e.ids, 1
        return ids, mask

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        texts = self.tok.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)
        return [_clean_up(t) for t in texts] if self.clean_up else texts


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
