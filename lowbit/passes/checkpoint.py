"""Resumable compiles: finished blocks' quantized layers saved as they complete.

A long calibrated compile (GPTQ) writes every finished block's layers to ``.<out>.ckpt/`` beside the
output folder (safetensors + JSON, one file per block, each written atomically, then ``state.json``).
Restarted with the same command and ``--resume``, the compile loads those layers instead of quantizing
them again: the calibration activations they produce are recomputed and identical, so every later block
is quantized exactly as in an uninterrupted run (a bit-identical artifact). A streaming LKD compile saves its
distilled blocks' layers the same way, and after each block the activations it hands to the next
(``DistillationChain``): its student's inputs come from the learned float weights, which the layers alone cannot
give back. The checkpoint is removed when the artifact is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from lowbit.format.shards import write_safetensors
from lowbit.ir.graph import QuantizedLayer
from lowbit.progress import say
from lowbit.errors import LowbitError
from lowbit.format.quantize import QuantSpec

STATE = "state.json"
CHAIN = "lkd-chain.safetensors"


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.ckpt"


def layer_from_saved(name: str, layout: dict, tensors: dict) -> QuantizedLayer:
    spec = QuantSpec(layout["bits"], layout["recipe_group_size"], layout["sym"])
    return QuantizedLayer(name=name, op=layout["op"], spec=spec, in_features=layout["in_features"],
                          out_features=layout["out_features"], group_size=layout["group_size"],
                          qweight=tensors["qweight"], scales=tensors["scales"], zeros=tensors["zeros"],
                          bias=tensors.get("bias"), method=layout["method"], stats=layout["stats"])


class Checkpoint:
    def __init__(self, out: Path, fingerprint: dict, resume: bool, quiet: bool = False):
        self.dir = checkpoint_dir(out)
        self.fingerprint = fingerprint
        self.layers: dict[str, str] = {}             # finished layer -> its block's file
        self._cached: tuple = (None, {})
        self.files: list[str] = []
        self.pending: dict[str, QuantizedLayer] = {}
        if resume and (self.dir / STATE).is_file():
            state = json.loads((self.dir / STATE).read_text())
            if state.get("fingerprint") != fingerprint:
                raise LowbitError(f"the checkpoint in '{self.dir}' was made by a different command (model, recipe "
                                  "or calibration differ); rerun without --resume to start over")
            for f in state["files"]:
                self._load(f)
            say(f"resuming: {len(self.layers)} layers from {len(self.files)} finished blocks", quiet)
        else:
            if resume:
                say(f"no checkpoint at '{self.dir}'; starting from the beginning", quiet)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            self._write_state()

    def _load(self, fname: str):
        for name in json.loads((self.dir / (fname + ".json")).read_text()):
            self.layers[name] = fname
        self.files.append(fname)

    def _read_block(self, fname: str) -> dict[str, QuantizedLayer]:
        tensors = load_file(str(self.dir / fname))
        layouts = json.loads((self.dir / (fname + ".json")).read_text())
        return {name: layer_from_saved(name, layout, {k.split("/", 1)[1]: v for k, v in tensors.items()
                                                      if k.split("/", 1)[0] == name})
                for name, layout in layouts.items()}

    def get(self, name: str) -> Optional[QuantizedLayer]:
        """A finished layer, read from its block's file (the last block read stays in memory), or None."""
        if name in self.pending:
            return self.pending[name]
        fname = self.layers.get(name)
        if fname is None:
            return None
        if self._cached[0] != fname:
            self._cached = (fname, self._read_block(fname))
        return self._cached[1][name]

    def add(self, q: QuantizedLayer):
        if q.name not in self.layers:
            self.pending[q.name] = q

    def flush(self):
        """Persist the pending layers as one block file (atomic), then record it in state.json."""
        if not self.pending:
            return
        fname = f"block-{len(self.files):04d}.safetensors"
        tensors = {f"{name}/{k}": t.contiguous() for name, q in self.pending.items() for k, t in q.tensors().items()}
        tmp = self.dir / (fname + ".tmp")
        save_file(tensors, str(tmp))
        _atomic_text(self.dir / (fname + ".json"), json.dumps({n: q.layout() for n, q in self.pending.items()}))
        os.replace(tmp, self.dir / fname)
        self.files.append(fname)
        self.layers.update({name: fname for name in self.pending})
        self.pending = {}
        self._write_state()

    def _write_state(self):
        _atomic_text(self.dir / STATE, json.dumps({"fingerprint": self.fingerprint, "files": self.files}, indent=1))

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class DistillationChain:
    """LKD's state between two blocks, in the checkpoint's folder: how many blocks are done, the teacher's and the
    student's activations at the next block's input (one tensor per batch), the blocks' loss records and the
    random generator's state. Written after the block's layers (``Checkpoint.flush``): a compile killed between the
    two distils that block again, to the same result, and ``Checkpoint.add`` keeps the layers saved first."""

    def __init__(self, checkpoint: Checkpoint):
        self.path = checkpoint.dir / CHAIN

    def save(self, done: int, teacher: list, student: list, stats: dict) -> None:
        tensors = {f"teacher/{i}": t.contiguous() for i, t in enumerate(teacher)}
        tensors.update({f"student/{i}": t.contiguous() for i, t in enumerate(student)})
        tensors["rng"] = torch.get_rng_state()
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_safetensors(tmp, tensors, {"done": str(done), "stats": json.dumps(stats)})
        os.replace(tmp, self.path)

    def load(self) -> Optional[tuple[int, list, list, dict]]:
        """(blocks done, teacher activations, student activations, loss records) as saved, the random generator
        restored; None when no block finished."""
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        batches = sum(k.startswith("teacher/") for k in tensors)
        torch.set_rng_state(tensors["rng"])
        return (int(meta["done"]), [tensors[f"teacher/{i}"] for i in range(batches)],
                [tensors[f"student/{i}"] for i in range(batches)], json.loads(meta["stats"]))


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_node(graph, recipe, checkpoint: Checkpoint, missing=None):
    """The streaming compile's quantization after a pass that saved layers (GPTQ, LKD; compiler/stream.py): a
    matmul the recipe selects takes the layer the pass saved in ``checkpoint``, or one it did not save goes to
    ``missing`` (e.g. ``rtn_node``; None: an error); returns the node that replaced it, or None."""
    from lowbit.passes.rtn import quantizable

    todo = {site.node: site for site, _ in quantizable(graph, recipe)}

    def quantize(node):
        site = todo.pop(node, None)
        if site is None:
            return None
        q = checkpoint.get(site.name)
        if q is None and missing is not None:
            return missing(node)
        if q is None:
            raise LowbitError(f"layer {site.name} is missing from the compile's checkpoint '{checkpoint.dir}'; "
                              "compile again without --resume")
        graph.replace_with_quantized(site, q)
        return site.node
    return quantize
