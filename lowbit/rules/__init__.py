"""Fusion rewrite rules on the quantized graph: a pattern, its replacement, and a numeric check.

A rule finds its pattern in the graph, rewrites every match (and counts the near-matches it left alone, with
the reason), and ``apply_rules`` runs the rewritten graph against the graph before any rule on random tokens:
a rule that changed what the graph computes fails the compile instead of shipping. Rules run after the
quantization passes, on what the artifact ships, so a rewrite changes what every runtime of the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.registry import Registry

# Largest output difference a rule may cause, relative to the output's largest magnitude: rules regroup exact
# operations (concatenated weights, fused epilogues), so only float reassociation may differ.
CHECK_TOLERANCE = 1e-4


@dataclass
class RuleResult:
    fired: int = 0
    rewrites: list = field(default_factory=list)      # what each firing replaced, e.g. "q_proj+k_proj+v_proj"
    skipped: dict = field(default_factory=dict)       # reason -> count of near-matches left alone

    def skip(self, reason: str):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"fired": self.fired, "rewrites": self.rewrites, "skipped": self.skipped}


def keep_meta(new, old, same_value: bool = False):
    """Carry the source location (module stack, stack trace) of a replaced node over to its replacement, and its
    traced value (shape, dtype) when the replacement computes the same tensor."""
    keys = ("nn_module_stack", "stack_trace") + (("val",) if same_value else ())
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def feed_codes(graph, x, codes, scales, site_of: dict):
    """Replace every ``lowbit::w8a8_linear`` reading ``x`` by ``w8a8_linear_codes`` reading ``x``'s INT8 codes and
    row scales (the outputs of a fused producer), keeping the matmul sites pointed at the new nodes."""
    g = graph.gm.graph
    for user in list(x.users):
        with g.inserting_before(user):
            new = g.call_function(torch.ops.lowbit.w8a8_linear_codes.default,
                                  (codes, scales, *user.args[1:8], graph.dtype))
        keep_meta(new, user, same_value=True)
        user.replace_all_uses_with(new)
        if user in site_of:
            site_of[user].node = new
        g.erase_node(user)


# In the order they run. Siblings first: the activation rule matches the halves of the merged gate/up matmul. The
# residual last: the others rewrite the matmuls it folds into (and read their positional arguments only).
RULES = Registry("fusion rule", {"merge_sibling_matmuls": "lowbit.rules.siblings:MergeSiblingMatmuls",
                                 "norm_quant_int8": "lowbit.rules.norm_quant:NormQuantInt8",
                                 "act_mul": "lowbit.rules.act_mul:ActMul",
                                 "residual_add": "lowbit.rules.residual_add:ResidualAdd"})


def default_rules() -> list:
    """One instance of every registered rule, in order."""
    return [RULES.get(name)() for name in RULES.names()]


def check_inputs(graph, seed: int = 0) -> tuple:
    """Random tokens as the graph's arguments: two sequences of eight, one left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, graph.vocab_size, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return graph.call_args(ids, mask)


def _max_rel_diff(a, b) -> float:
    worst = 0.0
    a, b = (a, b) if isinstance(a, (tuple, list)) else ((a,), (b,))
    for x, y in zip(a, b):
        if x.is_floating_point() and x.numel():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


@torch.no_grad()
def apply_rules(graph, rules: Optional[list] = None, check: bool = True) -> dict:
    """Run ``rules`` (default: all) on ``graph`` in order; {rule name: fired, rewrites, skipped, max_rel_diff}."""
    rules = default_rules() if rules is None else rules
    inputs = check_inputs(graph) if check else None
    reference = graph.gm(*inputs) if check else None
    out = {}
    for rule in rules:
        result = rule.apply(graph)
        graph.finalize()
        info = result.to_dict()
        if check and result.fired:
            diff = _max_rel_diff(graph.gm(*inputs), reference)
            info["max_rel_diff"] = diff
            if not diff <= CHECK_TOLERANCE:
                raise LowbitError(f"fusion rule {rule.name} changed the graph's outputs (relative difference "
                                  f"{diff:.2e} > {CHECK_TOLERANCE}); compile with --no-fuse "
                                  "(lowbit.compile(..., fuse=False)) and report this")
        out[rule.name] = info
    return out
