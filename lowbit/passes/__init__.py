"""Quantization passes (rtn, gptq, lkd), their recipes and the resume checkpoint. ``PASSES``: the weight passes a
recipe's ``method`` names (``fp`` runs none)."""

from lowbit.registry import Registry

PASSES = Registry("quantization pass", {"rtn": "lowbit.passes.rtn:rtn_pass", "gptq": "lowbit.passes.gptq:gptq_pass"})
