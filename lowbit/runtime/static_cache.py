"""The static-cache form of a step program: fixed-capacity K/V buffers written in place, the form CUDA graphs
need (every tensor the step reads or writes keeps its address and shape from step to step).

The shipped step appends this step's keys / values to the past (``present = cat(past, new)``), so its cache
grows and is reallocated every step. ``static_step`` rewrites it into two graphs:

- the **body**: each layer's ``cat`` becomes ``index_copy_`` of the new keys / values into a buffer
  [B, H_kv, capacity, D] at ``cache_position``, and attention reads the whole buffer; its inputs are
  ``input_ids``, ``position_ids``, ``cache_position``, one mask per distinct attention mask of the program,
  and the buffers; its output is the logits (the cache is updated in place, nothing is allocated for it);
- the **masks**: the program's own mask computation (causal, padding, sliding windows, whatever the
  architecture built), run on the filled prefix and padded with "masked" up to the capacity, so the body
  sees exactly the masks the dynamic step would, widened to the buffer.

Programs whose attention is not ``lowbit::attention`` (architectures with their own attention code) or that
read their cache other than through the appended ``cat`` have no static form; ``static_step`` says why.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit.errors import LowbitError

aten = torch.ops.aten


def static_step(gm: fx.GraphModule, n_cache: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(body, masks) of a step program ``gm`` with ``n_cache`` cache inputs (see the module docstring); both
    share ``gm``'s tensors."""
    graph = copy.deepcopy(gm.graph)
    nodes = list(graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    ids, mask_in, past = ph[0], ph[1], ph[3:]
    if len(past) != n_cache:
        raise LowbitError(f"static cache: the program takes {len(past)} cache tensors, not {n_cache}")
    out = next(n for n in nodes if n.op == "output")
    logits, present = out.args[0][0], list(out.args[0][1:])
    attention = [n for n in nodes if n.op == "call_function" and n.target == torch.ops.lowbit.attention.default]
    if not attention:
        raise LowbitError("static cache: this program's attention is the architecture's own code, not "
                          "lowbit::attention, so its masks cannot be widened to a fixed capacity; use the dynamic step")
    masks = list(dict.fromkeys(a.args[3] for a in attention if a.args[3] is not None))

    # The masks graph: the program's mask computation alone.
    mask_graph = copy.deepcopy(graph)
    mask_out = next(n for n in mask_graph.nodes if n.op == "output")
    by_name = {n.name: n for n in mask_graph.nodes}
    mask_out.args = (tuple(by_name[m.name] for m in masks),)
    mask_graph.eliminate_dead_code()

    # The body: in-place cache writes, masks as inputs, logits out.
    last = ph[-1]

    def placeholder(name):
        nonlocal last
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        return last

    cache_position = placeholder("cache_position")
    for j, m in enumerate(masks):
        m.replace_all_uses_with(placeholder(f"attn_mask_{j}"))
    for i, (p, cat) in enumerate(zip(past, present)):
        ok = (cat.op == "call_function" and cat.target == aten.cat.default and len(cat.args[0]) == 2
              and cat.args[1] in (2, -2) and cat.args[0][0] is p)
        if not ok:
            raise LowbitError(f"static cache: cache output {i} is not the input cache with this step appended; "
                              "this program has no static form (from an older lowbit? recompile it)")
        buf = placeholder(f"cache_{i}")
        with graph.inserting_after(cat):
            write = graph.call_function(aten.index_copy_.default, (buf, 2, cache_position, cat.args[0][1]))
        cat.replace_all_uses_with(write)
        # Batch, heads and head size read off the cache (torch.export takes a shared size from any input that
        # has it) are the buffer's too; its length is not.
        for u in list(p.users):
            if u.target == aten.sym_size.int and u.args[1] in (0, 1, 3, -1):
                u.args = (buf, u.args[1])
    for u in list(mask_in.users):
        if u.target == aten.sym_size.int and u.args[1] == 0:
            u.args = (ids, 0)
    out.args = ((logits,),)
    graph.eliminate_dead_code()
    for n in (*past, mask_in):
        if n.users:
            user = next(iter(n.users))
            raise LowbitError(f"static cache: the step reads its input {n.name} outside the attention masks and the "
                              f"cache update ({user.target}); this program has no static form")
        graph.erase_node(n)
    return fx.GraphModule(gm, graph), fx.GraphModule(gm, mask_graph)


class StaticCacheRunner:
    """Steps of a shipped program over fixed-capacity caches: ``start(batch)`` allocates the buffers once,
    ``step(ids, mask, positions, cache)`` writes this step's keys / values into them in place and returns
    (logits, the same cache). ``mask`` covers every position so far, this step's included (as for the
    dynamic step); the step writes at positions ``mask.shape[1] - S`` onwards."""

    def __init__(self, runner, capacity: int):
        if runner.kv is None:
            raise LowbitError("static cache: an encoder has no KV cache")
        self.runner, self.capacity = runner, int(capacity)
        self.body, self.masks = static_step(runner.gm, 2 * len(runner.kv))

    def start(self, batch: int, capacity: int = 0) -> list:
        """Zeroed buffers of this runner's own capacity (the ``capacity`` asked for must fit in it)."""
        if capacity > self.capacity:
            raise LowbitError(f"static cache: {capacity} positions asked for, the buffers hold {self.capacity}")
        r = self.runner
        return [torch.zeros(batch, h, self.capacity, d, dtype=r.dtype, device=r.device)
                for h, dk, dv in r.kv for d in (dk, dv)]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache: list):
        dev = self.runner.device
        input_ids, attention_mask, position_ids = (t.to(dev) for t in (input_ids, attention_mask, position_ids))
        s, total = input_ids.shape[1], attention_mask.shape[1]
        if total > self.capacity:
            raise LowbitError(f"static cache: {total} positions exceed the capacity of {self.capacity}")
        start = total - s
        filled = [c[:, :, :start] for c in cache]             # views: the masks graph reads only their sizes
        masks = self.masks(input_ids, attention_mask, position_ids, *filled)
        wide = [F.pad(m, (0, self.capacity - total), value=False if m.dtype == torch.bool else float("-inf"))
                for m in masks]
        positions = torch.arange(start, total, device=dev)
        logits = self.body(input_ids, position_ids, positions, *wide, *cache)
        return logits[0] if isinstance(logits, (tuple, list)) else logits, cache
