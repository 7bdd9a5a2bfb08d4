"""One registry mechanism (lowbit/registry.py) for quantization passes, fusion rules, targets' lowerings and
options, and runtime backends: every entry resolves, is named as registered, and a bad name is one line."""

import subprocess
import sys

import pytest

from lowbit.errors import LowbitError
from lowbit.passes import PASSES
from lowbit.passes.recipe import METHODS
from lowbit.rules import RULES, default_rules
from lowbit.targets import BACKENDS, LOWERINGS, OPTIONS, TARGETS


def test_every_entry_resolves_and_is_named_as_registered():
    for registry in (PASSES, RULES, LOWERINGS, OPTIONS, BACKENDS):
        assert all(registry.get(name) is not None for name in registry)
    assert [type(r).name for r in default_rules()] == RULES.names()
    assert set(PASSES) == set(METHODS) - {"fp"}
    assert set(LOWERINGS) == set(TARGETS)


def test_unknown_name_is_one_line():
    with pytest.raises(LowbitError, match="unknown fusion rule 'fold'; available: merge_sibling_matmuls, "
                                          "norm_quant_int8, act_mul, residual_add"):
        RULES.get("fold")


def test_listing_imports_nothing():
    """Names are known without importing the entries (a CLI lists targets without loading torch.onnx)."""
    code = ("import sys\nfrom lowbit.targets import LOWERINGS\nfrom lowbit.rules import RULES\n"
            "assert list(LOWERINGS) and RULES.names()\n"
            "assert not [m for m in sys.modules if m.startswith(('lowbit.lowering.', 'lowbit.rules.'))], sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
