"""Recipes: built-ins, TOML files, per-layer overrides and clear errors."""

import pytest

from lowbit.compiler.recipe import BUILTIN, Recipe, load_recipe
from lowbit.errors import LowbitError


def test_builtins_required_by_the_docs_exist():
    for name in ("fp", "rtn-w8", "rtn-w4g128", "rtn-w4g64", "rtn-w3g64"):
        assert name in BUILTIN
    r = load_recipe("rtn-w3g64")
    assert (r.method, r.bits, r.group_size, r.sym) == ("rtn", 3, 64, False)
    assert load_recipe("fp").spec_for("model.layers.0.mlp.up_proj") is None


def test_lm_head_float_unless_asked():
    assert load_recipe("rtn-w4g64").spec_for("lm_head") is None
    assert Recipe("x", "rtn", 4, 64, quantize_lm_head=True).spec_for("lm_head").bits == 4


def test_toml_with_overrides(tmp_path):
    p = tmp_path / "mixed.toml"
    p.write_text('method = "rtn"\nbits = 4\ngroup_size = 64\n'
                 '[[overrides]]\npattern = "*.mlp.down_proj"\nbits = 8\ngroup_size = 0\n'
                 '[[overrides]]\npattern = "model.layers.0.*"\nskip = true\n')
    r = load_recipe(str(p))
    assert r.name == "mixed"
    assert r.spec_for("model.layers.3.mlp.down_proj").bits == 8
    assert r.spec_for("model.layers.3.mlp.down_proj").group_size == 0
    assert r.spec_for("model.layers.0.self_attn.q_proj") is None
    assert r.spec_for("model.layers.1.self_attn.q_proj").describe() == "w4g64"


@pytest.mark.parametrize("text,needle", [
    ("bits = 4\nfoo = 1\n", "unknown field(s) foo; valid:"),
    ("bits = \n", "malformed recipe file"),
    ('method = "magic"\n', "unknown method 'magic'; valid: fp, rtn"),
    ("bits = 12\n", "bits=12 is out of range; valid: 2..8"),
    ('bits = "four"\n', "field 'bits' must be int"),
    ("group_size = 3\n", "group_size=3 is too small"),
    ('[[overrides]]\nbits = 8\n', "needs 'pattern'"),
    ('[[overrides]]\npattern = "*"\nbitz = 8\n', "needs 'pattern' and only fields"),
])
def test_bad_recipe_files(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(LowbitError, match=None) as e:
        load_recipe(str(p))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(LowbitError) as e:
        load_recipe("rtn-w5g7")
    assert "unknown recipe 'rtn-w5g7'" in str(e.value) and "rtn-w4g64" in str(e.value)
    with pytest.raises(LowbitError, match="does not exist"):
        load_recipe("missing.toml")
