"""The torch backend: the artifact's program (``format.graph``) as an fx GraphModule, run as it was shipped.

No transformers modeling code: the program is the traced, quantized step (causal LMs) or forward (encoders)
itself, with lowbit's ops on the packed weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.format import graph as graph_format
from lowbit.format.artifact import PROGRAM_FILE, WEIGHTS_FILE
from lowbit.format.graph import mask_positions
from lowbit.runtime.cpu_kernels import use_cpu_kernels

KERNELS = ("auto", "reference")


class TorchRunner:
    """``full(ids, mask)``, ``start(batch)`` and ``step(ids, mask, positions, cache)`` over the shipped program.

    The KV cache is the list of per-layer key/value tensors the program takes and returns.
    """

    def __init__(self, gm: torch.fx.GraphModule, program: dict, device="cpu", dtype=torch.float32,
                 kernels: Optional[dict] = None):
        self.gm, self.program, self.device, self.dtype = gm, program, torch.device(device), dtype
        self.task = program["task"]
        self.kv = program.get("kv")
        self.kernels = kernels or {}      # what use_cpu_kernels swapped in, for inspection and benchmarks

    @classmethod
    def open(cls, path: Path, manifest: dict, device="cpu", dtype=torch.float32, kernels: str = "auto",
             **_) -> "TorchRunner":
        """The runner of an artifact (``targets`` backend entry point)."""
        if not (path / PROGRAM_FILE).is_file():
            raise LowbitError(f"artifact '{path}' has no {PROGRAM_FILE} (compiled by a lowbit that shipped no "
                              "graph); recompile it")
        return cls.load(path, device, dtype, kernels)

    @classmethod
    def load(cls, path: Path, device="cpu", dtype=torch.float32, kernels: str = "auto") -> "TorchRunner":
        """``kernels``: ``auto`` (on CPU, the quantized matmuls repacked for torch's CPU kernels) or
        ``reference`` (every op's reference kernel: the oracle)."""
        if kernels not in KERNELS:
            raise LowbitError(f"unknown kernels '{kernels}'; choose one of: {', '.join(KERNELS)}")
        program = json.loads((path / PROGRAM_FILE).read_text())
        where = f"artifact '{path}': {PROGRAM_FILE}"
        graph_format.check_document(program, where)
        gm = graph_format.decode(program, load_file(str(path / WEIGHTS_FILE)), device=device, dtype=dtype,
                                 where=where)
        swapped = use_cpu_kernels(gm) if kernels == "auto" and torch.device(device).type == "cpu" else None
        return cls(gm, program, device, dtype, swapped)

    def start(self, batch: int, capacity: int = 0) -> list:
        """An empty cache; the step program appends to it (``capacity`` is a hint this runner does not need)."""
        return [torch.empty(batch, h, 0, d, dtype=self.dtype, device=self.device)
                for h, dk, dv in self.kv for d in (dk, dv)]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache: list):
        # Token ids, masks and positions arrive on the CPU; logits and the cache stay on the device.
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask,
                                                                                position_ids))
        out = self.gm(input_ids, attention_mask, position_ids, *cache)
        return out[0], list(out[1:])

    @torch.no_grad()
    def full(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "encoder":
            return self.gm(input_ids.to(self.device), attention_mask.to(self.device))[0]
        return self.step(input_ids, attention_mask, mask_positions(attention_mask), self.start(input_ids.shape[0]))[0]
