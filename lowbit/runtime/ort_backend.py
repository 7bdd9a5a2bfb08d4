"""ONNX Runtime backend: run an artifact's ``onnx/model.onnx`` (see ``lowering.onnx.lower`` for its inputs) with
the Engine's runner interface on torch tensors, over the numpy session of ``ort_session``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.ort_session import OrtSession


class OrtRunner(OrtSession):
    """One ONNX Runtime session over an artifact's ONNX model, with the Engine's runner interface."""

    @classmethod
    def open(cls, path: Path, manifest: dict, device="cpu", dtype=torch.float32, explicit_dtype=False,
             provider: str = "auto", threads: int = 0, **_) -> "OrtRunner":
        """The runner of an artifact (``targets`` backend entry point)."""
        if device != "cpu" or (explicit_dtype and dtype != torch.float32):
            raise LowbitError("--device and --dtype apply to the torch backend; ONNX Runtime runs the exported "
                              "graph's dtype where its --provider says (cpu or cuda)")
        return cls(path, manifest, provider, threads)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: list) -> tuple[torch.Tensor, list]:
        """Logits [B, S, V] for ``input_ids`` after ``cache``; returns them with the extended cache."""
        logits, cache = self.step_np(_np(input_ids), _np(attention_mask), _np(position_ids), cache)
        return torch.from_numpy(logits), cache

    def full(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of a causal LM over whole sequences (empty cache), or an encoder's last hidden state."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return torch.from_numpy(self.full_np(_np(input_ids), _np(attention_mask)))


def _np(t: torch.Tensor):
    return t.detach().to(torch.int64).cpu().numpy()
