"""The torch backend: the artifact's program (``format.program``) as an fx GraphModule, run as it was shipped.

No transformers modeling code: the program is the traced, quantized step (causal LMs) or forward (encoders)
itself, with lowbit's ops on the packed weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.format import program as program_format
from lowbit import ops  # noqa: F401  (registers the torch.ops.lowbit.* operators the program calls)
from lowbit.format.artifact import PROGRAM_FILE, member, read_json, read_manifest
from lowbit.format.shards import load_weights, weight_files
from lowbit.format.program import mask_positions
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
        self.where = "program"

    def _run(self, *inputs):
        # A program that passed the load-time checks can still fail on shapes it computes; that is the
        # artifact's fault, said in one line.
        try:
            return self.gm.forward(*inputs)      # not gm(...): fx's wrapper prints its own traceback to stderr
        except (RuntimeError, LookupError, TypeError, ValueError, ArithmeticError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise LowbitError(f"{self.where} failed while running: {first}") from None

    @classmethod
    def open(cls, path: Path, manifest: dict, device="cpu", dtype=torch.float32, kernels: str = "auto",
             **_) -> "TorchRunner":
        """The runner of an artifact (``targets`` backend entry point)."""
        if PROGRAM_FILE not in manifest["files"]:
            raise LowbitError(f"artifact '{path}' has no {PROGRAM_FILE} (compiled by a lowbit that shipped no "
                              "graph); recompile it")
        return cls.load(path, device, dtype, kernels, manifest)

    @classmethod
    def load(cls, path: Path, device="cpu", dtype=torch.float32, kernels: str = "auto",
             manifest: Optional[dict] = None) -> "TorchRunner":
        """``kernels``: ``auto`` (on CPU, the quantized matmuls repacked for torch's CPU kernels) or
        ``reference`` (every op's reference kernel: the oracle). Reads only files ``manifest`` (read and
        verified here when not given) lists."""
        if kernels not in KERNELS:
            raise LowbitError(f"unknown kernels '{kernels}'; choose one of: {', '.join(KERNELS)}")
        path = Path(path)
        manifest = manifest or read_manifest(path)
        where = f"artifact '{path}': {PROGRAM_FILE}"
        program = read_json(member(path, manifest, PROGRAM_FILE), where)
        program_format.check_document(program, where)
        check_interface(program, where)
        files = [member(path, manifest, name).name for name in weight_files(manifest["files"])]
        tensors = load_weights(path, files, f"artifact '{path}'")
        # decode empties ``tensors`` as it builds the module: the stored form is not held beside the running one.
        gm = program_format.decode(program, tensors, device=device, dtype=dtype, where=where, narrow_tables=True,
                                   keep_precision=True)
        swapped = use_cpu_kernels(gm) if kernels == "auto" and torch.device(device).type == "cpu" else None
        runner = cls(gm, program, device, dtype, swapped)
        runner.where = where
        return runner

    def start(self, batch: int, capacity: int = 0) -> list:
        """An empty cache; the step program appends to it (``capacity`` is a hint this runner does not need)."""
        return [torch.empty(batch, h, 0, d, dtype=self.dtype, device=self.device)
                for h, dk, dv in self.kv for d in (dk, dv)]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache: list):
        # Token ids, masks and positions arrive on the CPU; logits and the cache stay on the device.
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask,
                                                                                position_ids))
        out = self._run(input_ids, attention_mask, position_ids, *cache)
        return out[0], list(out[1:])

    # ---- continuous batching (runtime.batcher): positions come from the mask, so rows may move slots -------
    def cache_rows(self, cache: list, rows: list[int], left: int = 0, width=None, capacity: int = 0) -> list:
        """The cache of ``rows``, with ``left`` empty slots added at the front (``left`` < 0: dropped). (Its
        tensors are as wide as the mask: ``width`` and ``capacity`` are hints this runner does not need.)"""
        index = torch.tensor(rows, device=self.device)
        out = []
        for t in cache:
            t = t.index_select(0, index)
            if left > 0:
                t = torch.nn.functional.pad(t, (0, 0, left, 0))
            elif left < 0:
                t = t[:, :, -left:].contiguous()
            out.append(t)
        return out

    def cache_concat(self, caches: list) -> list:
        """Caches of the same width, one after another along the batch."""
        return [torch.cat(ts) for ts in zip(*caches)]

    @torch.no_grad()
    def full(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "encoder":
            return self._run(input_ids.to(self.device), attention_mask.to(self.device))[0]
        return self.step(input_ids, attention_mask, mask_positions(attention_mask), self.start(input_ids.shape[0]))[0]


def check_interface(program: dict, where: str) -> None:
    """The program's task, KV layout and inputs / outputs are what this runner feeds and reads."""
    task, kv = program.get("task"), program.get("kv")
    if task not in ("causal-lm", "encoder"):
        raise LowbitError(f"{where}: task must be causal-lm or encoder, not {str(task)[:40]!r}")
    if task == "causal-lm" and not (isinstance(kv, list) and kv and all(
            isinstance(layer, list) and len(layer) == 3 and all(type(v) is int and 0 < v <= 1 << 16 for v in layer)
            for layer in kv)):
        raise LowbitError(f"{where}: kv must list each layer's [kv heads, key dim, value dim] as positive integers")
    inputs = 3 + 2 * len(kv) if task == "causal-lm" else 2
    nodes = program["nodes"]
    placeholders = sum(1 for n in nodes if isinstance(n, dict) and n.get("op") == "placeholder")
    out = next((n.get("args") for n in nodes if isinstance(n, dict) and n.get("op") == "output"), None)
    outputs = len(out.get("tuple", out.get("list", []))) if isinstance(out, dict) else -1
    if placeholders != inputs or outputs != inputs - 2 + (task == "encoder"):
        raise LowbitError(f"{where}: a {task} program takes {inputs} inputs and returns "
                          f"{inputs - 2 + (task == 'encoder')} values; this one takes {placeholders} and returns "
                          f"{outputs}")
