"""The streaming compile: the graph quantized, fused, checked and written one block at a time.

The graph was traced without weights (frontend/skeleton.py) and reads each constant from the checkpoint when first
used (``Graph.source``). It is walked in ranges: the prologue (embedding, masks, rotary tables), each block, the
epilogue (final norm, head). In each range the one-token decode check's runs compute every node on the float
weights, and each matmul is quantized as soon as they have its output (its float weight is dropped then); the range
runs on random check tokens, each fusion rule rewrites it and the range runs again from the same inputs: the values
it hands on must agree with the unfused range's to the rules' tolerance (the in-memory compile checks the whole
graph's outputs instead). Then every constant no later node reads goes to the artifact's weight shards and leaves
memory: a checkpoint tensor no pass changed is copied in its stored dtype, never widened. Memory holds one float
matmul weight (or the vocabulary table) at a time, a block's quantized form until its shard is written, and one
range's activations on a few tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.host import release_free_memory
from lowbit.format.program import stored_form
from lowbit.ir.graph import Graph, block_of, module_of
from lowbit.ir.lazy import flat_args, run_node
from lowbit.progress import progress_bar

# Called with each node of a range in order, after the decode check's float runs have computed it: quantizes it
# when it is a matmul the recipe selects (Graph.replace_with_quantized) and returns the node that replaced it, or None.
QuantizeNode = Callable[[fx.Node], Optional[fx.Node]]


def range_keys(graph: Graph) -> Optional[list]:
    """The block of every range in order ([None, block 0, ..., None]), or None when some block's nodes are not
    contiguous (the graph cannot stream)."""
    keys: list = []
    for n in graph.gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("nn_module_stack"):
            b = block_of(module_of(n)[0])
            if not keys or keys[-1] != b:
                keys.append(b)
    blocks = [k for k in keys if k is not None]
    if len(blocks) != len(set(blocks)) or None in keys[1:-1]:
        return None
    if not keys or keys[0] is not None:
        keys.insert(0, None)
    if keys[-1] is not None:
        keys.append(None)
    return keys


def _block(n: fx.Node):
    """The block a call node belongs to, or ... for a node that says nothing (no module stack: it joins its range)."""
    if n.op not in ("call_function", "call_method") or not n.meta.get("nn_module_stack"):
        return ...
    return block_of(module_of(n)[0])


class StreamCompile:
    """One pass over ``graph``'s ranges: quantize, fuse with a check, write. ``run`` returns the rules' info.

    ``check_args``: the graph's arguments for the fusion check (random tokens). ``decode_runs`` (causal LMs): the
    one-token decode check's arguments (a prefill of 8 tokens, of 7, and a one-token step), run on the float
    weights range by range just before each matmul is quantized (the check is about the traced graph, and a
    quantized graph with per-tensor activation scales rightly differs between a prefill and a step); the step's
    past K/V are the 7-token run's present K/V as each block produces them, and ``decode_mismatch`` compares the
    step's last logits with the 8-token run's at the end, as frontend/trace.py does on a graph in memory."""

    def __init__(self, graph: Graph, writer, check_args: tuple, quantize: QuantizeNode,
                 rules: Optional[list] = None, tolerance: float = 1e-4, show_progress: bool = True,
                 decode_runs: Optional[list] = None):
        self.graph, self.writer, self.quantize, self.rules = graph, writer, quantize, rules or []
        self.tolerance, self.show_progress = tolerance, show_progress
        nodes = list(graph.gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = nodes[-1]
        self.env = dict(zip(placeholders, flat_args(check_args)))
        # The step's past starts as zeros of its shape (the prologue reads only its length) and becomes run 1's
        # present K/V when a node first reads it (_float_runs).
        self.past = placeholders[3:] if decode_runs else []  # after input_ids, attention_mask, position_ids
        self.decode_envs = [dict(zip(placeholders, flat_args(args))) for args in decode_runs or []]
        self.cursor = placeholders[-1]
        self.done: set = set(placeholders)
        self.info = {getattr(r, "name", type(r).__name__): {"fired": 0, "rewrites": [], "skipped": {}}
                     for r in self.rules}

    @torch.no_grad()
    def run(self) -> dict:
        keys = range_keys(self.graph)
        if keys is None:
            raise LowbitError("this architecture's blocks are not contiguous in its traced graph, so it cannot be "
                              "compiled block by block; report it")
        for i, key in enumerate(progress_bar(keys, desc="blocks", disable=not self.show_progress)):
            self._range_step(key, last=i == len(keys) - 1)
        self.graph.finalize()
        return self.info

    def decode_mismatch(self) -> Optional[str]:
        """After ``run`` with ``decode_runs``: None when the one-token step gave the 8-token prefill's last logits."""
        from lowbit.frontend.trace import decode_mismatch

        logits = self.output.args[0][0]
        return decode_mismatch(self.decode_envs[0][logits][:, -1], self.decode_envs[2][logits][:, -1])

    def _range(self, key, last: bool) -> list:
        """The nodes after the cursor up to the first call of another block (to the output, for the last range)."""
        nodes, n = [], self.cursor.next
        while n.op != "output" and n.op != "root":
            b = _block(n)
            if not last and b is not ... and b != key:
                break
            nodes.append(n)
            n = n.next
        return nodes

    def _range_step(self, key, last: bool):
        g = self.graph
        self._float_runs(self._range(key, last))
        for name, q in g.quantized.items():           # the packed tensors live on in the graph until written
            if q.qweight is not None:
                g.forget_packed(name)
        self._prune()
        nodes = self._range(key, last)
        users = self._outside_users(nodes)
        handed = [(u, list(u.all_input_nodes)) for u in users]
        env, reference = self._execute(nodes, users)
        for rule in self.rules:
            result = rule.apply(g, nodes)
            self._prune()
            info = self.info[rule.name]
            info["fired"] += result.fired
            info["rewrites"] += result.rewrites
            for reason, count in result.skipped.items():
                info["skipped"][reason] = info["skipped"].get(reason, 0) + count
            if result.fired:
                nodes = self._range(key, last)
                env, values = self._execute(nodes, users)
                diff = _max_rel_diff(values, reference)
                info["max_rel_diff"] = max(info.get("max_rel_diff", 0.0), diff)
                if not diff <= self.tolerance:
                    raise LowbitError(f"fusion rule {rule.name} changed the outputs of {key or 'the model'} "
                                      f"(relative difference {diff:.2e} > {self.tolerance}); compile with "
                                      "--no-fuse (lowbit.compile(..., fuse=False)) and report this")
        self._rekey_decode_values(handed)
        self.done.update(nodes)
        live = lambda e: {n: v for n, v in e.items() if any(u not in self.done for u in n.users)}  # noqa: E731
        self.env, self.decode_envs = live(env), [live(e) for e in self.decode_envs]
        if nodes:
            self.cursor = nodes[-1]
        self._write_finished(everything=last)
        release_free_memory()

    def _float_runs(self, nodes: list):
        """Run the decode check's runs over ``nodes`` on the float weights, quantizing each matmul once they have
        its float output (its weight is in memory then, and leaves it quantized)."""
        for n in nodes:
            if n.op not in ("call_function", "call_method"):
                continue
            for r, env in enumerate(self.decode_envs):
                if r == 2:
                    self._feed_past(n, env)
                env[n] = run_node(self.graph, n, env)
            new = self.quantize(n)
            if new is not None:
                for env in self.decode_envs:
                    env[new] = env.pop(n)

    def _rekey_decode_values(self, handed: list):
        """The decode runs' values the range hands on, under the nodes that compute them after the rules (a rule
        replaces a node by one that computes the same value, checked above)."""
        moves = {}
        for u, before in handed:
            moves.update({old: new for old, new in zip(before, u.all_input_nodes) if old is not new})
        for env in self.decode_envs:
            values = {old: env[old] for old in moves if old in env}
            env.update({moves[old]: v for old, v in values.items()})

    def _feed_past(self, n: fx.Node, env: dict):
        """The step run's past K/V that ``n`` reads: the 7-token run's present K/V (computed by now)."""
        present = dict(zip(self.past, self.output.args[0][1:]))
        for a in n.all_input_nodes:
            if a in present and present[a] in self.decode_envs[1]:
                env[a] = self.decode_envs[1][present[a]]

    def _prune(self):
        """Drop what the rewrite left unused (no recompile: nothing calls the module here)."""
        self.graph.prune()

    def _outside_users(self, nodes: list) -> list:
        inside = set(nodes)
        return list(dict.fromkeys(u for n in nodes for u in n.users if u not in inside))

    def _execute(self, nodes: list, users: list) -> tuple[dict, list]:
        """(the check run's values after running ``nodes`` from the range's inputs, the values ``users`` read from
        the range)."""
        env = dict(self.env)
        for n in nodes:
            if n.op in ("call_function", "call_method"):
                env[n] = run_node(self.graph, n, env)
        inside = set(nodes)
        return env, [env[a] for u in users for a in u.all_input_nodes if a in inside]

    def _write_finished(self, everything: bool):
        """Write every constant no node still to run reads, and drop it from memory."""
        g, source = self.graph, self.graph.source
        names = g.stored_names()
        readers: dict[str, list] = {}
        for n in g.gm.graph.nodes:
            if n.op == "get_attr":
                readers.setdefault(n.target, []).extend(n.users)
        for target, users in readers.items():
            if target in g.written:
                g.unbind(target)
                continue
            if not everything and any(u not in self.done for u in users):
                continue
            if source is not None and target in source.names:
                g.unbind(target)             # unchanged since the checkpoint: copied as stored
                t, widened = _stored(source.read(target, stored=True), source.dtypes[target], g)
            else:
                t, widened = stored_form(g.attr_value(target), g.dtype, g.storage_dtype)
                g.unbind(target)
            self.writer.add(names.get(target, target), t)
            g.written[target] = (names.get(target, target), widened)


def _stored(raw: torch.Tensor, traced: torch.dtype, graph: Graph) -> tuple[torch.Tensor, bool]:
    """A checkpoint tensor as the artifact stores it: in the checkpoint's dtype when that is the storage dtype (so
    exact), else as ``stored_form`` stores the traced value."""
    if raw.is_floating_point() and raw.dtype == graph.storage_dtype and traced == graph.dtype != raw.dtype:
        return raw, True
    return stored_form(raw.to(traced) if raw.is_floating_point() else raw, graph.dtype, graph.storage_dtype)


def _max_rel_diff(values: list, reference: list) -> float:
    if len(_tensors(values)) != len(_tensors(reference)):
        return float("inf")
    worst = 0.0
    for x, y in zip(_tensors(values), _tensors(reference)):
        if x.is_floating_point() and x.numel():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def _tensors(values) -> list:
    out = []
    for v in values:
        out += _tensors(v) if isinstance(v, (list, tuple)) else [v] if isinstance(v, torch.Tensor) else []
    return out
