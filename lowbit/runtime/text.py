"""Text in, text out: ``generate``, ``stream`` and ``chat``, the same on the torch Engine and the torch-free
LiteEngine (both mix in ``TextGeneration``), over the shared loop of ``runtime.generation``.

Streamed text is the same pieces a non-streamed call joins, so the two cannot differ.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence as Seq, Union

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import generation
from lowbit.runtime.chat import ChatTemplate
from lowbit.runtime.sampling import GenerationSettings

CHAT_MAX_NEW_TOKENS = 256      # a reply runs to its end-of-turn token, within this unless told


class TextGeneration:
    """Needs ``task``, ``path``, ``max_positions``, ``_eos`` (end-of-sequence ids), ``runner.start``,
    ``_step_np(ids, mask, positions, cache) -> (logits [B, V], cache)`` and ``_text`` (a tokenizer with
    ``encode(texts, add_special_tokens)``, ``decode(ids)``, ``pad_id``, ``folder``) or None."""

    task: str
    max_positions: int
    _eos: list
    _text: object

    # ---- tokens ----------------------------------------------------------------------------
    def _generate_np(self, ids: np.ndarray, mask: np.ndarray, settings: GenerationSettings) -> np.ndarray:
        self._need_causal_lm()
        return generation.generate(self._step_np, self.runner.start, ids, mask, settings, self.max_positions,
                                   self._eos, self._text.decode if self._text is not None else None)

    def _need_causal_lm(self):
        if self.task != "causal-lm":
            raise LowbitError("generate needs a causal LM artifact; this one is an encoder")

    def _tokenizer(self):
        if self._text is None:
            raise LowbitError(f"artifact '{self.path}' has no tokenizer.json; use generate_ids() with token ids")
        return self._text

    def _encode(self, prompts: list, add_special_tokens: bool = True) -> list[list[int]]:
        rows = self._tokenizer().encode(prompts, add_special_tokens)
        if any(len(r) == 0 for r in rows):
            raise LowbitError("empty prompt; give some text to continue")
        return rows

    # ---- text ------------------------------------------------------------------------------
    def events(self, prompts: Seq[str], settings: GenerationSettings,
               add_special_tokens: bool = True) -> Iterator[tuple[int, str, Optional[str]]]:
        """``(prompt index, new text, finish reason or None)`` as each token is generated, for a batch of
        prompts run together; every prompt ends with one event whose finish reason is "stop" or "length"."""
        self._need_causal_lm()
        rows = self._encode(list(prompts), add_special_tokens)
        tok = self._text
        seqs = [generation.Sequence(r, settings, self._eos, i, tok.decode) for i, r in enumerate(rows)]
        ids, mask = generation.pad_rows(rows, tok.pad_id)
        pad = int(self._eos[0]) if self._eos else 0
        for step_events in generation.run(self._step_np, self.runner.start, ids, mask, seqs, self.max_positions, pad):
            for row, _, piece in step_events:
                yield row, piece, seqs[row].finish_reason

    def generate(self, prompts: Union[str, Seq[str]], max_new_tokens: int = 32,
                 callback: Optional[Callable[[str], None]] = None, **settings) -> Union[str, list[str]]:
        """Text continuations (only the new text) for one prompt or a batch of prompts. ``callback(piece)``: called
        with each piece of text as it is generated (one prompt only). Settings: ``GenerationSettings``."""
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        if callback is not None and not single:
            raise LowbitError("callback streams one prompt; call generate once per prompt")
        s = GenerationSettings.of(max_new_tokens=max_new_tokens, **settings)
        texts = [""] * len(batch)
        for row, piece, _ in self.events(batch, s):
            texts[row] += piece
            if callback is not None and piece:
                callback(piece)
        return texts[0] if single else texts

    def stream(self, prompt: str, max_new_tokens: int = 32, **settings) -> Iterator[str]:
        """The continuation of ``prompt`` piece by piece as it is generated (complete characters, stop strings
        cut out). Settings: ``GenerationSettings``."""
        s = GenerationSettings.of(max_new_tokens=max_new_tokens, **settings)
        return (piece for _, piece, _ in self.events([prompt], s) if piece)

    # ---- chat ------------------------------------------------------------------------------
    def chat_template(self) -> ChatTemplate:
        """The chat template of the artifact's tokenizer (refused in one line when it has none)."""
        template = ChatTemplate.load(self._tokenizer().folder)
        if template is None:
            raise LowbitError(f"artifact '{self.path}' has no chat template (its tokenizer is not a chat model's); "
                              "use generate() with plain text")
        return template

    def chat(self, messages: list, max_new_tokens: int = CHAT_MAX_NEW_TOKENS, stream: bool = False,
             callback: Optional[Callable[[str], None]] = None, **settings) -> Union[dict, Iterator[str]]:
        """The assistant's reply to ``messages`` ([{"role": ..., "content": ...}], rendered with the model's own
        chat template): ``{"role": "assistant", "content": text}``, or with ``stream`` an iterator of its text."""
        prompt = self.chat_template().render(messages)
        s = GenerationSettings.of(max_new_tokens=max_new_tokens, **settings)
        # The template writes the special tokens itself (a BOS among them): the tokenizer adds none.
        pieces = (piece for _, piece, _ in self.events([prompt], s, add_special_tokens=False) if piece)
        if stream:
            return pieces
        text = ""
        for piece in pieces:
            text += piece
            if callback is not None:
                callback(piece)
        return {"role": "assistant", "content": text}
