"""The one registry mechanism: named entries, each a "module:attribute" path resolved on first use, so listing or
validating names imports nothing. Quantization passes (``passes.PASSES``), fusion rules (``rules.RULES``),
targets' lowerings and runtime backends (``targets``) are registries of this kind; adding one is one entry."""

from __future__ import annotations

import importlib

from lowbit.errors import LowbitError


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind, self._paths, self._loaded = kind, dict(entries), {}

    def names(self) -> list[str]:
        """The entries' names, in registration order (an order that matters for rules)."""
        return list(self._paths)

    def __contains__(self, name) -> bool:
        return name in self._paths

    def __iter__(self):
        return iter(self._paths)

    def get(self, name: str):
        """The entry ``name`` (imported now if needed); one line naming the known ones otherwise."""
        if name not in self._paths:
            raise LowbitError(f"unknown {self.kind} '{name}'; available: {', '.join(self._paths)}")
        if name not in self._loaded:
            module, _, attr = self._paths[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]
