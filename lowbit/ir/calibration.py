"""Calibration: text -> token windows, and the streaming calibrator that quantizes true-sequentially.

The streaming calibrator runs the calibration set through the traced graph from one quantized matmul to the
next. When it reaches a matmul that is to be quantized, the matmul's input is there for every sample: it builds
the Hessian from it (once per input node, so Q/K/V and gate/up share one), asks the quantizer for the layers
reading it and rewrites their nodes to the quantized op. It then runs the nodes up to the next matmul to quantize
one sample chunk at a time, *with the quantized weights*, keeping for every chunk only the values later nodes
read (that matmul's input, the residual stream). Every later layer therefore calibrates on inputs that went
through the quantized layers before it (GPTQ's "true sequential"), in one pass over the graph, holding one
frontier of activations: what crosses from one quantized matmul to the next, not every intermediate value.
Nodes that no quantized layer depends on (the lm_head and the loss of a causal LM) are never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from lowbit.distributed import Ranks
from lowbit.host import MemoryReleaser
from lowbit.ir.graph import Graph, MatmulSite, QuantizedLayer
from lowbit.ir.lazy import call
from lowbit.errors import LowbitError


class Hessian:
    """Running ``H = 2/n * sum(x^T x)`` over calibration tokens, float32 (or float64) accumulation."""

    def __init__(self, k: int, device="cpu", dtype=torch.float32):
        self.sum = torch.zeros(k, k, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0,
                        max_positions: Optional[int] = None) -> torch.Tensor:
    """``samples`` random windows [samples, seq_len] of the tokenized text (reproducible by ``seed``)."""
    if samples < 1:
        raise LowbitError(f"--calib-samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise LowbitError(f"--calib-seq-len must be at least 2, got {seq_len}")
    if max_positions and seq_len > max_positions:
        raise LowbitError(f"--calib-seq-len {seq_len} is longer than the model's context of {max_positions} "
                          "tokens; use a smaller --calib-seq-len")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0] if text.strip() \
        else torch.empty(0, dtype=torch.long)
    need = samples * seq_len
    if ids.numel() < need:
        raise LowbitError(f"calibration text has {ids.numel()} tokens; {samples} samples x {seq_len} tokens need "
                          f"at least {need}; give more text or lower --calib-samples / --calib-seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# quantize(site, hessian) -> QuantizedLayer or None (keep float); hessian is the [K, K] 2/n X^T X.
QuantizeFn = Callable[[MatmulSite, torch.Tensor], Optional[QuantizedLayer]]


@dataclass
class StreamStats:
    peak_frontier_bytes: int = 0
    nodes_run: int = 0
    hessians: int = 0
    per_layer_seconds: dict = field(default_factory=dict)


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


class StreamingCalibrator:
    """Runs ``graph`` over calibration ``ids`` node by node, quantizing ``targets`` in graph order."""

    def __init__(self, graph: Graph, ids: torch.Tensor, chunk: int = 8, device="cpu",
                 hessian_dtype=torch.float32, ranks: Optional[Ranks] = None):
        self.graph, self.device, self.hessian_dtype = graph, torch.device(device), hessian_dtype
        self.ranks = ranks or Ranks()        # ids: this process's share; Hessians summed over all processes
        ids = ids.to(self.device)
        # A weightless graph (Graph.source) moves each constant when it is read (_constant) instead.
        self.moves = graph.source is None
        if self.moves:
            graph.gm.to(self.device)
        # Every placeholder of the graph per chunk: a prefill of the chunk over an empty cache.
        self.chunks = [graph.flat_inputs(c, torch.ones_like(c)) for c in ids.split(chunk)]
        self.stats = StreamStats()

    def _needed(self, targets: set) -> set:
        """Nodes some target matmul depends on (ancestors of the targets' inputs)."""
        needed, stack = set(), [self.graph.sites[name].input_node for name in targets]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        return needed

    @torch.no_grad()    # weights require grad: without this every activation would stay alive in autograd
    def run(self, targets: list[str], quantize: QuantizeFn, on_layer: Optional[Callable] = None):
        """Quantize the sites named in ``targets`` (graph order); ``on_layer(site, q)`` after each one."""
        g = self.graph
        target_set = set(targets)
        sites_by_node = {g.sites[name].node: g.sites[name] for name in targets}
        needed = self._needed(target_set)
        order = [n for n in g.gm.graph.nodes if n in needed or n in sites_by_node]
        # Last use of every value among the nodes we run; the quantized sites' outputs count too. A weightless
        # graph's constants (Graph.source) are read when first used and dropped after their last use.
        last_use: dict[fx.Node, int] = {}
        last_read: dict[str, int] = {}
        for i, n in enumerate(order):
            for a in n.all_input_nodes:
                last_use[a] = i
                if a.op == "get_attr":
                    last_read[a.target] = i
        # Sites sharing an input share one Hessian.
        sharing: dict[fx.Node, list[str]] = {}
        for name in targets:
            sharing.setdefault(g.sites[name].input_node, []).append(name)
        swapped: list[str] = []                    # layers swapped in, whose packed tensors go after their segment
        env: dict[fx.Node, list] = {}
        placeholders = {n: [c[j] for c in self.chunks]
                        for j, n in enumerate(x for x in g.gm.graph.nodes if x.op == "placeholder")}
        position = {n: i for i, n in enumerate(order)}
        pending = set(sites_by_node)               # sites not quantized yet: each needs its input for every chunk
        release = MemoryReleaser()
        i = 0
        while i < len(order):
            if order[i] in pending:
                # The sites reading this input (Q/K/V, gate/up) share one Hessian: all are quantized now.
                inp = sites_by_node[order[i]].input_node
                names = sharing[inp]
                hessian = self._hessian(env[inp], sites_by_node[order[i]].in_features)
                solved = self._solve(names, hessian, quantize)
                del hessian
                for name in names:
                    site = g.sites[name]
                    old = site.node
                    pending.discard(old)
                    if solved[name] is not None:
                        g.replace_with_quantized(site, solved[name])       # site.node is now the lowbit op
                        if self.moves:
                            g.gm.to(self.device)                         # its new buffers too
                        order[position[old]] = site.node
                        if old in last_use:
                            last_use[site.node] = last_use.pop(old)
                        for a in site.node.all_input_nodes:
                            if a.op == "get_attr":
                                last_read[a.target] = position[old]
                        swapped.append(name)
                    if on_layer is not None:
                        on_layer(site, solved[name])
            # Up to the next site still to quantize, one sample chunk at a time.
            j = next((k for k in range(i + 1, len(order)) if order[k] in pending), len(order))
            self._run_segment(order, i, j, env, placeholders, last_use, last_read)
            if g.source is not None:
                for name in swapped:
                    g.forget_packed(name)                # in the pass's checkpoint by now
            swapped.clear()
            release()                                    # the chunks' freed values, back to the system
            i = j
        g.finalize()
        if self.moves:
            g.gm.to("cpu")
        return self.stats

    def _constant(self, target: str) -> torch.Tensor:
        t = self.graph.attr(target)
        return t if self.moves else t.to(self.device)

    def _drop_constants(self, read: list, i: int, last_read: dict):
        """A weightless graph's constants in ``read`` that no later node reads: checkpoint tensors are read again
        if needed, a quantized layer's packed tensors are in the pass's checkpoint by now."""
        for a in read:
            if a.op == "get_attr" and last_read.get(a.target, -1) <= i:
                self.graph.unbind(a.target)

    def _hessian(self, chunks: list, k: int) -> torch.Tensor:
        h = Hessian(k, device=self.device, dtype=self.hessian_dtype)
        for x in chunks:
            h.add(x)
        if self.ranks.world > 1:
            self.ranks.sum(h.sum)
            h.n = int(self.ranks.sum(torch.tensor([h.n], device=self.device))[0])
        self.stats.hessians += 1
        return h.value()

    def _solve(self, names: list[str], hessian: torch.Tensor, quantize: QuantizeFn) -> dict:
        """The layers that share one Hessian (Q/K/V, gate/up); under torchrun each is solved by one process and
        sent to all."""
        if self.ranks.world == 1:
            return {name: quantize(self.graph.sites[name], hessian) for name in names}
        mine = {name: quantize(self.graph.sites[name], hessian) for i, name in enumerate(names)
                if self.ranks.owner(i) == self.ranks.rank}
        return {name: self.ranks.broadcast(mine.get(name), src=self.ranks.owner(i)) for i, name in enumerate(names)}

    def _run_segment(self, order: list, start: int, stop: int, env: dict, placeholders, last_use: dict,
                     last_read: dict):
        """Run ``order[start:stop]`` (no site still to quantize among them; the ones just quantized lead) one
        sample chunk at a time: a value only these nodes read lives for one chunk, and only the values later nodes
        read are kept for every chunk. The results are the node-by-node ones (each chunk's ops are the same); the
        frontier holds what crosses to the next site, not every intermediate (an MLP's gate, up and activation
        for all samples)."""
        nodes = [(i, order[i]) for i in range(start, stop) if order[i].op != "get_attr"]
        kept = {n: [] for _, n in nodes if last_use.get(n, -1) >= stop}
        for c in range(len(self.chunks)):
            local: dict = {}
            for i, node in nodes:
                local[node] = self._execute(node, c, env, placeholders, local)
                for a in node.all_input_nodes:
                    if a in local and a not in kept and last_use.get(a, -1) <= i:
                        del local[a]
            for n, values in kept.items():
                values.append(local[n])
        env.update(kept)
        self.stats.nodes_run += len(nodes)
        read = list(dict.fromkeys(a for _, n in nodes for a in n.all_input_nodes))
        self._release(read, [n for _, n in nodes], stop - 1, env, last_use, last_read)

    def _release(self, read: list, ran: list, i: int, env: dict, last_use: dict, last_read: dict):
        """After ``order[i]``: drop the values and constants no later node reads; record the frontier."""
        if self.graph.source is not None:
            self._drop_constants(read, i, last_read)
        for a in read:
            if last_use.get(a, -1) <= i and a in env:
                del env[a]
        for n in ran:
            if n not in last_use:                    # a value nobody we run reads (a target's output)
                env.pop(n, None)
        # Activations only: constants (weights read by get_attr) are not part of the frontier.
        self.stats.peak_frontier_bytes = max(self.stats.peak_frontier_bytes,
                                             sum(_nbytes(v) for n, v in env.items() if n.op != "get_attr"))

    def _execute(self, node: fx.Node, c: int, env: dict, placeholders, local: Optional[dict] = None):
        """The node's value for sample chunk ``c`` (its inputs from ``local``, this chunk's own, or ``env``)."""
        if node.op == "placeholder":
            return placeholders[node][c]

        def value(a):
            if a.op == "get_attr":
                return self._constant(a.target)
            return local[a] if local is not None and a in local else env[a][c]

        return call(node, fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value), self.graph.gm)
