"""Recipes: built-ins, TOML files, per-layer overrides and clear errors."""

import pytest

from lowbit.passes.recipe import BUILTIN, Recipe, load_recipe
from lowbit.passes.settings import Scheme
from lowbit.errors import LowbitError


def test_builtins_required_by_the_docs_exist():
    for name in ("fp", "rtn-w8", "rtn-w4g128", "rtn-w4g64", "rtn-w3g64"):
        assert name in BUILTIN
    r = load_recipe("rtn-w3g64")
    assert (r.method, r.scheme.bits, r.scheme.group_size, r.scheme.sym) == ("rtn", 3, 64, False)
    assert load_recipe("fp").spec_for("model.layers.0.mlp.up_proj") is None


def test_lm_head_float_unless_asked():
    assert load_recipe("rtn-w4g64").spec_for("lm_head") is None
    assert Recipe("x", "rtn", Scheme(4, 64, quantize_lm_head=True)).spec_for("lm_head").bits == 4


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
    ("overrides = [1, 2]\n", "override #1 must be a table ([[overrides]] with pattern"),
    ('overrides = "*.mlp.*"\n', "'overrides' must be an array of tables"),
    ('[[overrides]]\npattern = ""\n', "field 'pattern' must be a non-empty module-name glob"),
    ('[[overrides]]\npattern = 3\n', "field 'pattern' must be str, got 3"),
    ('[[overrides]]\npattern = "*"\nbits = 1\n', "bad.toml': override '*': bits=1 is out of range; valid: 2..8"),
    ('[[overrides]]\npattern = "*"\nsym = "yes"\n', "field 'sym' must be bool, got 'yes'"),
    ("min_zero = 1\n", "unknown field(s) min_zero; valid:"),
    ("fuse = false\n", "'fuse' is not a recipe field: fusion is a compile option (lowbit compile --no-fuse"),
    ("act_bits = 4\n", "act_bits=4; valid: 0, 8"),
    ("bits = true\n", "field 'bits' must be int, got True"),
    ("lkd = true\nlkd_steps = 0\n", "lkd_steps=0 (--lkd-steps): must be >= 1"),
    ("lkd = true\nlkd_batch = -2\n", "lkd_batch=-2 (--lkd-batch): must be >= 1"),
    ("lkd = true\nlkd_lr = -1\n", "lkd_lr=-1.0 (--lkd-lr): must be a finite number >= 0"),
    ("lkd = true\nlkd_lr = nan\n", "lkd_lr=nan (--lkd-lr): must be a finite number >= 0"),
    ('lkd = true\nlkd_lr = "fast"\n', "field 'lkd_lr' must be float, got 'fast'"),
    ('lkd = true\nlkd_data = "web"\n', "lkd_data='web' (--lkd-data): valid: calib, random"),
    ("lkd_steps = 50\n", "lkd_steps set but lkd is not true; add lkd = true to distil"),
    ("lkd = false\nlkd_lr = 1e-3\n", "lkd_lr set but lkd is not true"),
    ("damp = 0\n", "damp=0.0 is out of range; valid: 0 < damp < 10"),
    ("block = 0\n", "block=0 must be >= 1"),
    ('hessian_dtype = "float16"\n', "hessian_dtype 'float16'; valid: float32, float64"),
    ("[bits]\nvalue = 4\n", "field 'bits' must be int"),
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


def test_every_recipe_field_has_a_checked_type():
    from lowbit.passes.recipe import _FIELDS, _OVERRIDE_FIELDS, _TYPES

    assert (_FIELDS | _OVERRIDE_FIELDS) - {"overrides"} <= set(_TYPES)


def test_non_utf8_recipe_file(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('name = "d\u00e9j\u00e0"\n'.encode("latin-1"))
    with pytest.raises(LowbitError) as e:
        load_recipe(str(p))
    assert "is not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8" in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("overrides = [1, 2]\n", "override #1 must be a table"),
    ("fuse = false\n", "'fuse' is not a recipe field"),
    (b"bits = 4 # \xff\n", "is not UTF-8 text"),
])
def test_bad_recipe_through_the_cli(text, needle, model_dirs, tmp_path, capsys):
    from lowbit.cli import main

    p = tmp_path / "bad.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["compile", str(model_dirs["llama"]), "-r", str(p), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_recipe_parts_are_typed_and_frozen():
    import dataclasses

    from lowbit.passes.settings import GPTQSettings, LKDSettings

    r = load_recipe("zq-w4a8-mixed-lkd")
    assert isinstance(r.scheme, Scheme) and isinstance(r.gptq, GPTQSettings) and isinstance(r.lkd, LKDSettings)
    assert load_recipe("zq-w4a8-mixed").lkd is None and r.scheme.act_bits == 8 and len(r.scheme.overrides) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.scheme.bits = 3
    with pytest.raises(LowbitError, match="bits=9 is out of range"):
        Scheme(bits=9)
    with pytest.raises(LowbitError, match="damp=0 is out of range"):
        GPTQSettings(damp=0)
    with pytest.raises(LowbitError, match="scheme must be a Scheme"):
        Recipe("x", "rtn", {"bits": 4})


def test_every_builtin_round_trips_through_its_flat_form(tmp_path):
    """The flat form (a recipe file's keys, the manifest's entry) reads back to the same recipe."""
    import tomllib

    for name, r in BUILTIN.items():
        flat = r.to_dict()
        assert Recipe.from_dict(flat) == r, name
        p = tmp_path / f"{name}.toml"
        p.write_text(_toml(flat))
        assert load_recipe(str(p)) == r and tomllib.loads(p.read_text())["name"] == name
    # Negative control: a changed field does not compare equal.
    changed = dict(BUILTIN["gptq-w4g64"].to_dict(), damp=0.02)
    assert Recipe.from_dict(changed) != BUILTIN["gptq-w4g64"]


def _toml(flat: dict) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"')
    lines = [f"{k} = {value(v)}" for k, v in flat.items() if k != "overrides"]
    for o in flat["overrides"]:
        lines += ["[[overrides]]"] + [f"{k} = {value(v)}" for k, v in o.items()]
    return "\n".join(lines) + "\n"


def test_fuse_is_a_compile_option(model_dirs, tmp_path):
    import json

    import lowbit
    from lowbit.cli import main

    assert main(["compile", str(model_dirs["llama"]), "-r", "rtn-w4g64", "-o", str(tmp_path / "a"), "-q",
                 "--no-fuse"]) == 0
    fused = lowbit.compile(str(model_dirs["llama"]), "rtn-w4g64", out=tmp_path / "b", quiet=True)
    assert "rules" not in json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "rules" in json.loads((fused / "manifest.json").read_text())
