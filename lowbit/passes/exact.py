"""The check every float rewrite before the weight pass makes (activation-aware scales, rotations): the graph's
logits for a probe are unchanged, to the rounding of its dtype."""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph

# Largest relative difference of the logits: float32 rounding, or one rounding of each rewritten weight in half
# precision.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 3e-2


def check_unchanged(graph: Graph, probe: torch.Tensor, before: Optional[torch.Tensor] = None, what: str = ""):
    """Without ``before``: the graph's float logits for the token ids ``probe`` [1, T], to compare later. With it:
    the largest relative difference of the logits now, raising LowbitError (naming ``what``) past the tolerance."""
    with torch.no_grad():
        logits = graph(probe, torch.ones_like(probe)).float()
    if before is None:
        return logits
    diff = float((logits - before).abs().max() / before.abs().max().clamp_min(1e-12))
    tolerance = TOLERANCE.get(graph.dtype, HALF_TOLERANCE)
    if not diff <= tolerance:
        raise LowbitError(f"{what} changed the float model's logits by {diff:.2e} (> {tolerance}); report this, and "
                          f"compile with a recipe without it meanwhile")
    return diff
