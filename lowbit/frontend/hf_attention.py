"""transformers attention that traces to one ``lowbit::attention`` op, registered under the name "lowbit".

transformers' own attention functions branch on ``q_len == 1`` and on broadcastable sizes, so a graph
traced with them only serves the shapes it was traced with (a prefill graph cannot decode). Every model
whose attention goes through transformers' ``AttentionInterface`` (``_supports_attention_backend``) can
use this one instead; its masks always come materialized (never "skip the mask, use is_causal"), so the
traced step computes the same thing for any batch, sequence and cache length.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit import ops  # noqa: F401  (registers torch.ops.lowbit.attention)

NAME = "lowbit"
# Attention features lowbit::attention does not compute; a model that needs one keeps transformers' attention.
UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def supports(model_class, config) -> bool:
    return bool(getattr(model_class, "_supports_attention_backend", False)) and \
        not getattr(config, "attn_logit_softcapping", None)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature: q [B, H, S, D], k/v [B, H_kv, T, D] -> ([B, S, H, D], None)."""
    used = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if used:
        raise LowbitError(f"lowbit attention does not compute {used[0]} ({type(module).__name__}); this model "
                          "needs transformers' attention")
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        s, t = query.shape[2], key.shape[2]
        attention_mask = torch.ones(s, t, dtype=torch.bool, device=query.device).tril(t - s)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.lowbit.attention(query, key, value, attention_mask, scale, groups), None


def _materialized_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register():
    """Make ``attn_implementation="lowbit"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _materialized_mask)
