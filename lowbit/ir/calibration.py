"""Calibration: text -> token windows, and the streaming calibrator that quantizes true-sequentially.

The streaming calibrator runs the calibration set through the traced graph *node by node* (every node
over all calibration chunks before the next node), freeing each value after its last use. When it
reaches a matmul that is to be quantized, the matmul's input is already there for every sample: it
builds the Hessian from it (once per input node, so Q/K/V and gate/up share one), asks the quantizer for
the layer, rewrites the node to the quantized op and computes the node's output *with the quantized
weight*. Every later layer therefore calibrates on inputs that went through the quantized layers before
it (GPTQ's "true sequential"), in one pass over the graph, holding one frontier of activations.
Nodes that no quantized layer depends on (the lm_head and the loss of a causal LM) are never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from lowbit.distributed import Ranks
from lowbit.ir.graph import Graph, MatmulSite, QuantizedLayer
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
        # Sites sharing an input share one Hessian; it lives until the last of them is quantized.
        sharing: dict[fx.Node, list[str]] = {}
        for name in targets:
            sharing.setdefault(g.sites[name].input_node, []).append(name)
        hessians: dict[fx.Node, torch.Tensor] = {}
        solved: dict[str, Optional[QuantizedLayer]] = {}      # layers solved ahead, across processes
        env: dict[fx.Node, list] = {}
        placeholders = {n: [c[j] for c in self.chunks]
                        for j, n in enumerate(x for x in g.gm.graph.nodes if x.op == "placeholder")}
        for i, node in enumerate(order):
            if node.op == "get_attr":
                continue                            # a constant is read where it is used (_execute)
            read = list(node.all_input_nodes)       # with a quantized site's float weight, which the swap drops
            swapped = None
            if node in sites_by_node:
                site = sites_by_node[node]
                inp = site.input_node
                if inp not in hessians:
                    hessians[inp] = self._hessian(env[inp], site.in_features)
                    if self.ranks.world > 1:
                        solved.update(self._solve_shared(sharing[inp], hessians[inp], quantize))
                q = solved.pop(site.name) if site.name in solved else quantize(site, hessians[inp])
                sharing[inp].remove(site.name)
                if not sharing[inp]:
                    del hessians[inp]
                if q is not None:
                    g.replace_with_quantized(site, q)     # site.node is now the lowbit op
                    if self.moves:
                        g.gm.to(self.device)              # its new buffers too
                    if node in last_use:
                        last_use[site.node] = last_use.pop(node)
                    node, swapped = site.node, site.name
                    for a in node.all_input_nodes:
                        if a.op == "get_attr":
                            last_read[a.target] = i
                if on_layer is not None:
                    on_layer(site, q)
            env[node] = self._execute(node, env, placeholders)
            self.stats.nodes_run += 1
            read = list(dict.fromkeys(read + node.all_input_nodes))
            if g.source is not None:
                self._drop_constants(read, i, last_read)
                if swapped is not None:
                    g.forget_packed(swapped)              # in the pass's checkpoint by now
            for a in read:
                if last_use.get(a, -1) <= i and a in env:
                    del env[a]
            if node not in last_use:                 # a value nobody we run reads (a target's output)
                env.pop(node, None)
            # Activations only: constants (weights read by get_attr) are not part of the frontier.
            self.stats.peak_frontier_bytes = max(self.stats.peak_frontier_bytes,
                                                 sum(_nbytes(v) for n, v in env.items() if n.op != "get_attr"))
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

    def _solve_shared(self, names: list[str], hessian: torch.Tensor, quantize: QuantizeFn) -> dict:
        """The layers that share one Hessian (Q/K/V, gate/up), each solved by one process and sent to all."""
        mine = {name: quantize(self.graph.sites[name], hessian) for i, name in enumerate(names)
                if self.ranks.owner(i) == self.ranks.rank}
        return {name: self.ranks.broadcast(mine.get(name), src=self.ranks.owner(i)) for i, name in enumerate(names)}

    def _execute(self, node: fx.Node, env: dict, placeholders) -> list:
        """The node's value for every chunk (a shared value for constants)."""
        n_chunks = len(self.chunks)
        if node.op == "placeholder":
            return placeholders[node]

        def value(a, c):
            return self._constant(a.target) if a.op == "get_attr" else env[a][c]

        out = []
        for c in range(n_chunks):
            args = fx.node.map_arg(node.args, lambda a: value(a, c))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: value(a, c))
            if node.op == "call_function":
                out.append(node.target(*args, **kwargs))
            elif node.op == "call_method":
                out.append(getattr(args[0], node.target)(*args[1:], **kwargs))
            elif node.op == "call_module":
                out.append(self.graph.gm.get_submodule(node.target)(*args, **kwargs))
            else:
                raise RuntimeError(f"streaming calibrator cannot run node {node.op} {node.target}")
        return out
