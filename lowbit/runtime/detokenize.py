"""Text from tokens as they are generated: pieces that never split a UTF-8 character or lose a word's leading
space, and stop strings cut out of the text before any of it is shown. Streamed and non-streamed text are the same
pieces joined, so they cannot differ.
"""

from __future__ import annotations

from typing import Callable, Sequence

CONTEXT = 5       # prompt tokens decoded before the first new one, so its leading space decodes as mid-text


class TextDecoder:
    """``add(token) -> new text`` for one sequence, from ``decode(ids) -> str``.

    Each call decodes a short window: the tokens since the last shown text plus a few before them. A token
    that ends mid-character (the window decodes to U+FFFD at its end) shows nothing until the character is
    complete. The window starts inside the prompt, so a tokenizer that strips the first token's leading space
    (SentencePiece's) keeps it between the prompt and the continuation.
    """

    def __init__(self, decode: Callable[[list], str], prompt: Sequence[int] = ()):
        self.decode = decode
        self.ids = [int(t) for t in prompt[-CONTEXT:]]
        self.prefix = 0                   # the window starts here
        self.read = len(self.ids)         # text up to here has been shown

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def flush(self) -> str:
        """What is held back at the end (a character the sequence never completed)."""
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(shown):]


class StopMatcher:
    """Cuts the text at the first stop string: ``feed(piece) -> (text safe to show, stopped)``. Text that may be
    the start of a stop string is held back until it is known not to be one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
