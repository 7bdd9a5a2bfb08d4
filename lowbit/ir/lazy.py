"""Running a weightless graph: constants read from its weight source when first used, dropped after their last use.

A graph traced without weights (frontend/skeleton.py) holds FakeTensor constants; ``Graph.attr`` reads one from
``graph.source`` on first use. Running the whole graph that way would end with every weight in memory, so
``run_lazily`` interprets it node by node and drops each constant it read once no later node uses it: a forward
pass over a model of any size holds one frontier of activations and the weights of the node being run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves, tree_unflatten

from lowbit.errors import LowbitError


def node_value(graph, env: dict, a: fx.Node):
    """The value of ``a``: a constant (read if need be) or a value already computed in ``env``."""
    return graph.attr(a.target) if a.op == "get_attr" else env[a]


def run_node(graph, node: fx.Node, env: dict):
    """Compute one call node from the values in ``env``."""
    args = fx.node.map_arg(node.args, lambda a: node_value(graph, env, a))
    kwargs = fx.node.map_arg(node.kwargs, lambda a: node_value(graph, env, a))
    return call(node, args, kwargs)


def call(node: fx.Node, args, kwargs, gm: Optional[fx.GraphModule] = None):
    """One call node applied to its argument values; a ``call_module`` node needs its GraphModule ``gm``."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module" and gm is not None:
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise LowbitError(f"cannot run graph node {node.name} ({node.op} {node.target}) node by node")


@torch.no_grad()
def run_lazily(graph, args: tuple):
    """``graph``'s outputs for placeholder values ``args``; the constants this run read are dropped again."""
    nodes = list(graph.gm.graph.nodes)
    last: dict = {}                     # value -> index of its last reader; constants by attribute
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a.target if a.op == "get_attr" else a] = i
    before = {t for t in graph.constants() if not isinstance(graph.attr_value(t), FakeTensor)}
    env = dict(zip([n for n in nodes if n.op == "placeholder"], flat_args(args)))
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            out = fx.node.map_arg(n.args[0], lambda a: node_value(graph, env, a))
            spec = getattr(graph.gm, "_out_spec", None)
            return out if spec is None else tree_unflatten(list(out), spec)
        env[n] = run_node(graph, n, env)
        for a in n.all_input_nodes:
            key = a.target if a.op == "get_attr" else a
            if last.get(key) != i:
                continue
            if a.op != "get_attr":
                env.pop(a, None)
            elif a.target not in before:
                graph.unbind(a.target)
    raise LowbitError("the graph has no output node")


def flat_args(args: tuple) -> list:
    """The graph's placeholder values for its call arguments (the step's past K/V list is one argument)."""
    return tree_leaves(list(args))

