"""Run the program's quantized matmuls on the CPU kernels (``kernels/cpu.py``): at load, each
``lowbit::wna16_linear`` node whose format they cover becomes a call of its repacked layer, and the packed
tensors it no longer reads are dropped, so the weight is held once. The rest keep the reference kernel, said
once per reason."""

from __future__ import annotations

import collections
import sys

import torch

from lowbit.kernels import cpu


def use_cpu_kernels(gm: torch.fx.GraphModule) -> dict:
    """Rewrite ``gm`` in place; returns ``{"cpu": swapped, "reference": {reason: count}}``."""
    linear = torch.ops.lowbit.wna16_linear.default
    swapped, kept = 0, collections.Counter()

    def tensor(n):
        return None if n is None else getattr(gm, n.target)

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not linear:
            continue
        x, qweight, scales, zeros, bias, bits, group_size, in_features = node.args[:8]
        why = cpu.cpu_support(bits, group_size, in_features)
        if why is not None:
            kept[why] += 1
            continue
        name = f"cpu_linear_{swapped}"
        gm.add_submodule(name, cpu.CpuQuantLinear(tensor(qweight), tensor(scales), tensor(zeros), tensor(bias), bits,
                                                  group_size, in_features))
        residual = node.kwargs.get("residual", node.args[8] if len(node.args) > 8 else None)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,), {} if residual is None else {"residual": residual})
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        swapped += 1
        for n in (qweight, scales, zeros, bias):        # the packed form leaves memory as its copy is made
            if n is not None and not n.users and n.target in gm._buffers:
                gm.graph.erase_node(n)
                # A tied table (a quantized embedding and its head) is read by another node too: kept for it.
                if not any(m.op == "get_attr" and m.target == n.target for m in gm.graph.nodes):
                    del gm._buffers[n.target]
    gm.graph.eliminate_dead_code()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b not in read]:
        del gm._buffers[name]
    gm.recompile()
    for why, n in kept.items():
        print(f"lowbit: {n} quantized matmul(s) run the reference kernel on CPU: {why}", file=sys.stderr)
    return {"cpu": swapped, "reference": dict(kept)}
