"""Recipes: what to quantize and how, by built-in name or TOML file.

A recipe is a method (``fp``, ``rtn``), default weight settings (bits, group size, symmetric), and
per-layer overrides matched by module-name glob (``*.mlp.down_proj``), first match wins. ``lm_head`` stays
float unless ``quantize_lm_head = true``, the token embedding unless ``quantize_embeddings = true``. Example TOML::

    name = "my-w4"
    method = "rtn"
    bits = 4
    group_size = 64          # <= 0: per output channel
    sym = false
    quantize_lm_head = false
    quantize_embeddings = false  # the token embedding table, same format, rows = vocabulary
    mse = false                # clipping search for scales
    act_bits = 0               # 8: per-token INT8 activations (W8A8); needs sym = true
    lkd = false                # layer-by-layer distillation before quantizing (ZeroQuant LKD)
    lkd_steps = 100
    lkd_lr = 1e-4
    lkd_batch = 4
    # method = "gptq" only:
    act_order = true           # with static_groups = true (contiguous groups, no g_idx)
    static_groups = true
    damp = 0.01
    block = 128
    hessian_dtype = "float32"  # or "float64"

    [[overrides]]
    pattern = "*.mlp.down_proj"
    bits = 8

    [[overrides]]
    pattern = "model.layers.0.*"
    skip = true              # keep these float
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.format.quantize import ACT_BITS, MAX_BITS, MIN_BITS, QuantSpec

METHODS = ("fp", "rtn", "gptq")
HESSIAN_DTYPES = ("float32", "float64")
MIN_ZEROS = (0, 1)
HEAD_NAMES = ("lm_head",)
ATTENTION_PATTERNS = ("*.self_attn.*", "*.attn.*", "*.attention.*")


@dataclass
class Override:
    pattern: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    act_bits: Optional[int] = None
    skip: bool = False


@dataclass
class Recipe:
    name: str = "custom"
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False
    mse: bool = False                 # clipping search for group scales (RTN and GPTQ)
    act_bits: int = 0                 # 8: per-token dynamic INT8 activations (W8A8); needs sym weights
    # Layer-by-layer knowledge distillation before the weight pass (passes/lkd.py)
    lkd: bool = False
    lkd_steps: int = 100              # Adam steps per block
    lkd_lr: float = 1e-4
    lkd_batch: int = 4                # sequences per step
    # GPTQ only
    act_order: bool = True            # columns by decreasing Hessian diagonal
    static_groups: bool = True        # group params fixed up front: contiguous groups, no g_idx
    damp: float = 0.01                # dampening, fraction of the Hessian's mean diagonal
    block: int = 128                  # lazy batch width
    hessian_dtype: str = "float32"
    min_zero: int = 0                 # set by targets whose format cannot store a zero point below it
    fuse: bool = True                 # run the fusion rules (lowbit.rules) on the quantized graph
    overrides: list[Override] = field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowbitError(f"recipe '{self.name}': unknown method '{self.method}'; valid: {', '.join(METHODS)}")
        for who, bits, group in [("recipe", self.bits, self.group_size)] + [
                (f"override '{o.pattern}'", o.bits, o.group_size) for o in self.overrides]:
            if bits is not None and not (MIN_BITS <= bits <= MAX_BITS):
                raise LowbitError(f"{who} in '{self.name}': bits={bits} is out of range; valid: {MIN_BITS}..{MAX_BITS}")
            if group is not None and group > 0 and group < 8:
                raise LowbitError(f"{who} in '{self.name}': group_size={group} is too small; use >= 8, "
                                  "or <= 0 for per-channel")
        for who, act, sym in [("recipe", self.act_bits, self.sym)] + [
                (f"override '{o.pattern}'", self.act_bits if o.act_bits is None else o.act_bits,
                 self.sym if o.sym is None else o.sym) for o in self.overrides if not o.skip]:
            if act not in ACT_BITS:
                raise LowbitError(f"{who} in '{self.name}': act_bits={act}; valid: "
                                  f"{', '.join(map(str, ACT_BITS))} (0 keeps activations float)")
            if act and not sym:
                raise LowbitError(f"{who} in '{self.name}': act_bits={act} needs symmetric weights (sym = true) "
                                  "so both matmul operands are plain integers")
        if not (0 < self.damp < 10):
            raise LowbitError(f"recipe '{self.name}': damp={self.damp} is out of range; valid: 0 < damp < 10")
        for key in ("block", "lkd_steps", "lkd_batch"):
            if getattr(self, key) < 1:
                raise LowbitError(f"recipe '{self.name}': {key}={getattr(self, key)} must be >= 1")
        if not (self.lkd_lr > 0 and math.isfinite(self.lkd_lr)):
            raise LowbitError(f"recipe '{self.name}': lkd_lr={self.lkd_lr} must be a finite number > 0")
        # min_zero is a floor on stored asymmetric zero points: 1 for formats that store "zero - 1" (hf-gptq).
        # Anything above 1 would only shrink the grid, and >= 2**bits - 1 leaves no code above the zero.
        if self.min_zero not in MIN_ZEROS:
            raise LowbitError(f"recipe '{self.name}': min_zero={self.min_zero} is out of range; valid: 0..1")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise LowbitError(f"recipe '{self.name}': hessian_dtype '{self.hessian_dtype}'; valid: "
                              f"{', '.join(HESSIAN_DTYPES)}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def quantizes(self) -> bool:
        return self.method != "fp"

    def spec_for(self, layer: str, embedding: bool = False) -> Optional[QuantSpec]:
        """The QuantSpec for a layer name (a matmul, or the token embedding), or None when it stays float."""
        if not self.quantizes or (embedding and not self.quantize_embeddings):
            return None
        if layer in HEAD_NAMES and not self.quantize_lm_head:
            return None
        spec = QuantSpec(self.bits, self.group_size, self.sym, self.min_zero, self.act_bits)
        for o in self.overrides:
            if fnmatch.fnmatchcase(layer, o.pattern):
                if o.skip:
                    return None
                return replace(spec, **{k: v for k, v in (("bits", o.bits), ("group_size", o.group_size),
                                                          ("sym", o.sym), ("act_bits", o.act_bits))
                                                   if v is not None})
        return spec

    def describe(self) -> str:
        if self.method == "fp":
            return "float, no quantization"
        out = (f"{self.method}: {self.bits}-bit, " + ("per-channel" if self.group_size <= 0 else f"group {self.group_size}")
               + (", symmetric" if self.sym else ", asymmetric"))
        if self.method == "gptq":
            out += ", act-order + static groups" if self.act_order else ", column order"
        out += f", INT{self.act_bits} per-token activations" if self.act_bits else ""
        out += "".join(f", {o.pattern}: w{o.bits}" for o in self.overrides if o.bits and not o.skip)
        out += f", + LKD ({self.lkd_steps} steps/block)" if self.lkd else ""
        return out + (", MSE clipping" if self.mse else "")

    def to_dict(self) -> dict:
        return asdict(self)


def _builtin() -> dict[str, Recipe]:
    r = {"fp": Recipe("fp", method="fp")}
    for bits, group in [(8, 0), (8, 128), (4, 128), (4, 64), (4, 32), (3, 128), (3, 64), (2, 64)]:
        name = f"rtn-w{bits}" + (f"g{group}" if group else "")
        r[name] = Recipe(name, "rtn", bits, group)
    # Symmetric INT4: the form TensorRT and ONNX Runtime run natively (no zero points).
    for group in (128, 64):
        r[f"rtn-w4g{group}-sym"] = Recipe(f"rtn-w4g{group}-sym", "rtn", 4, group, sym=True)
    for bits, group in [(4, 64), (3, 64)]:
        r[f"rtn-w{bits}g{group}-mse"] = Recipe(f"rtn-w{bits}g{group}-mse", "rtn", bits, group, mse=True)
    # GPTQ: act-order + static groups by default (without act-order GPTQ can lose to RTN on Llama-family
    # models); "-noact" is the paper's plain column order with groups computed on the fly.
    for bits, group in [(8, 128), (4, 128), (4, 64), (3, 64), (2, 64)]:
        base = f"gptq-w{bits}g{group}"
        r[base] = Recipe(base, "gptq", bits, group)
        r[f"{base}-noact"] = Recipe(f"{base}-noact", "gptq", bits, group, act_order=False, static_groups=False)
        r[f"{base}-mse"] = Recipe(f"{base}-mse", "gptq", bits, group, mse=True)
    # ZeroQuant. W8A8: symmetric per-channel INT8 weights, per-token dynamic INT8 activations. Mixed:
    # symmetric INT4 for the MLP/FC matmuls, INT8 for the attention projections (by module name:
    # Llama-family self_attn, GPT-2 attn, BERT attention), groups of 32 with the MSE clipping search (on
    # the demo LM, W4A8 perplexity 20.58 at g64 min/max -> 18.20; the demo encoder's cosine 0.971 -> 0.981),
    # with float or per-token INT8 activations. Each has an "-lkd" variant with distillation first.
    attention = [Override(p, bits=8) for p in ATTENTION_PATTERNS]
    for name, kw in [("zq-w8a8", dict(bits=8, group_size=0, act_bits=8)),
                     ("zq-w4a16-mixed", dict(bits=4, group_size=32, mse=True, act_bits=0, overrides=attention)),
                     ("zq-w4a8-mixed", dict(bits=4, group_size=32, mse=True, act_bits=8, overrides=attention))]:
        for suffix, lkd in (("", False), ("-lkd", True)):
            r[name + suffix] = Recipe(name + suffix, "rtn", sym=True, lkd=lkd, **kw)
    return r


BUILTIN = _builtin()
_FIELDS = {f for f in Recipe.__dataclass_fields__}
_OVERRIDE_FIELDS = {f for f in Override.__dataclass_fields__}
_TYPES = {"name": str, "method": str, "bits": int, "group_size": int, "sym": bool, "quantize_lm_head": bool,
          "quantize_embeddings": bool, "mse": bool, "act_bits": int, "lkd": bool, "lkd_steps": int,
          "lkd_lr": float, "lkd_batch": int, "act_order": bool, "static_groups": bool, "damp": float,
          "block": int, "hessian_dtype": str, "min_zero": int, "fuse": bool,
          "pattern": str, "skip": bool}


def _check_types(where: str, table: dict):
    for key, value in table.items():
        want = _TYPES.get(key)
        if want is float and type(value) is int:
            value = float(value)
        if want is not None and (type(value) is not want):
            raise LowbitError(f"{where}: field '{key}' must be {want.__name__}, got {value!r}")


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")        # TOML is UTF-8 whatever the locale says
    except OSError as e:
        raise LowbitError(f"cannot read recipe file '{path}': {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LowbitError(f"recipe file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LowbitError(f"malformed recipe file '{path}': {e}") from None


def _override(path: Path, i: int, o) -> Override:
    where = f"recipe file '{path}', override #{i + 1}"
    if not isinstance(o, dict):
        raise LowbitError(f"{where} must be a table ([[overrides]] with pattern = \"...\"), got {o!r}")
    bad = set(o) - _OVERRIDE_FIELDS
    if bad or "pattern" not in o:
        raise LowbitError(f"{where} needs 'pattern' and only fields {', '.join(sorted(_OVERRIDE_FIELDS))} "
                          f"(got {', '.join(sorted(o))})")
    _check_types(where, o)
    if not o["pattern"]:
        raise LowbitError(f"{where}: field 'pattern' must be a non-empty module-name glob, e.g. \"*.mlp.down_proj\"")
    return Override(**o)


def from_toml(path: Path) -> Recipe:
    data = _read_toml(path)
    unknown = set(data) - _FIELDS
    if unknown:
        raise LowbitError(f"recipe file '{path}': unknown field(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(_FIELDS))}")
    _check_types(f"recipe file '{path}'", {k: v for k, v in data.items() if k != "overrides"})
    raw_overrides = data.pop("overrides", [])
    if not isinstance(raw_overrides, list):
        raise LowbitError(f"recipe file '{path}': 'overrides' must be an array of tables ([[overrides]])")
    overrides = [_override(path, i, o) for i, o in enumerate(raw_overrides)]
    data.setdefault("name", path.stem)
    return Recipe(**data, overrides=overrides)


def load_recipe(arg) -> Recipe:
    """A Recipe from a Recipe, a built-in name or a path to a .toml file."""
    if isinstance(arg, Recipe):
        return arg
    if arg in BUILTIN:
        return replace(BUILTIN[arg], overrides=[replace(o) for o in BUILTIN[arg].overrides])
    path = Path(arg)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise LowbitError(f"recipe file '{arg}' does not exist")
        return from_toml(path)
    raise LowbitError(f"unknown recipe '{arg}'; built-in recipes: {', '.join(BUILTIN)} (or a path to a .toml file)")
