"""Recipes: what to quantize and how, by built-in name or TOML file.

A ``Recipe`` is a method (``fp``, ``rtn``, ``gptq``), the ``Scheme`` every layer is quantized to (bits, group
size, symmetry, activation bits, per-layer overrides matched by module-name glob, first match wins), GPTQ's
settings and, when it distils first, LKD's (the typed parts live in ``passes/settings.py``). ``lm_head`` stays
float unless ``quantize_lm_head = true``, the token embedding unless ``quantize_embeddings = true``. A recipe
file is the flat form of the same fields (``Recipe.to_dict``, which the manifest records). Example TOML::

    name = "my-w4"
    method = "gptq"
    # the scheme
    bits = 4
    group_size = 64            # <= 0: per output channel
    sym = false
    act_bits = 0               # 8: per-token INT8 activations (W8A8); needs sym = true
    mse = false                # clipping search for scales
    quantize_lm_head = false
    quantize_embeddings = false  # the token embedding table, same format, rows = vocabulary
    # GPTQ's settings (method = "gptq")
    act_order = true           # with static_groups = true (contiguous groups, no g_idx)
    static_groups = true
    damp = 0.01
    block = 128
    hessian_dtype = "float32"  # or "float64"
    # activation-aware scaling (AWQ) of each norm's or up projection's readers before the weight pass;
    # calibrates on --calib like GPTQ (passes/awq.py)
    awq = false
    # orthogonal rotations of the residual stream and of each attention's values folded into the weights, first
    # (passes/rotate.py; RMSNorm models)
    rotate = false
    # orthogonal rotations run on the activations (lowbit::rotate), each undone in the weight of the matmul that reads
    # them: "down" before each MLP's down projection, "all" before every quantized matmul (any architecture); for
    # per-token INT8 activations. The exports (transformers, GGUF) cannot hold them
    online_rotate = "down"
    # each quantized matmul's bits and group chosen to minimize the estimated loss within this many stored bits
    # per weight (scales and zero points included: w4g64 is 4.375, w3g64 3.375): lowbit compile --budget-bits
    budget_bits = 3.5
    # layer-by-layer distillation before the weight pass (ZeroQuant LKD); lkd_* keys only with lkd = true
    lkd = true
    lkd_steps = 100            # also lkd_lr, lkd_batch, lkd_data, lkd_samples, lkd_seq_len, lkd_seed, lkd_loss,
                               # lkd_inputs: the --lkd-* flags of lowbit compile, which override them

    [[overrides]]
    pattern = "*.mlp.down_proj"
    bits = 8

    [[overrides]]
    pattern = "model.layers.0.*"
    skip = true              # keep these float
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.passes.settings import GPTQSettings, LKDSettings, Override, Scheme, check_types, field_types

METHODS = ("fp", "rtn", "gptq")
# online_rotate's values: which matmuls' inputs are rotated at run time ("" none).
ONLINE_ROTATIONS = {"": "", "down": "each MLP's down projection", "all": "every quantized matmul"}
ATTENTION_PATTERNS = ("*.self_attn.*", "*.attn.*", "*.attention.*")
# The built-in learnt-rounding settings: 100 steps on 32 sequences at 4 bits; 200 on 64 below (AutoRound's step
# count), which takes the demo LM's w3g64 from 1.390x to 1.336x float perplexity (docs/benchmarks.md).
ROUNDING = {4: LKDSettings(learn="rounding"), 3: LKDSettings(learn="rounding", steps=200, samples=64)}


@dataclass(frozen=True)
class Recipe:
    """A method and its settings: the scheme every pass produces, GPTQ's settings, and LKD's when it distils."""
    name: str = "custom"
    method: str = "rtn"
    scheme: Scheme = Scheme()
    gptq: GPTQSettings = GPTQSettings()
    lkd: Optional[LKDSettings] = None     # None: no distillation
    awq: bool = False                     # activation-aware scaling before the weight pass (passes/awq.py)
    rotate: bool = False                  # rotations of the residual stream and values first (passes/rotate.py)
    budget_bits: float = 0.0              # > 0: each layer's format planned within this size (passes/budget.py)
    online_rotate: str = ""               # "down" | "all": rotate those matmuls' inputs online (passes/rotate.py)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowbitError(f"recipe '{self.name}': unknown method '{self.method}'; valid: {', '.join(METHODS)}")
        if self.online_rotate not in ONLINE_ROTATIONS:
            raise LowbitError(f"recipe '{self.name}': online_rotate must be one of "
                              f"{', '.join(repr(v) for v in ONLINE_ROTATIONS if v)}, got {self.online_rotate!r}")
        for key in ("awq", "rotate", "online_rotate"):
            if getattr(self, key) and self.lkd is not None:
                raise LowbitError(f"recipe '{self.name}': {key} and lkd do not combine yet (LKD learns on the "
                                  f"transformers model's blocks, which the {key} rewrite of the graph leaves as they "
                                  "were); use one of them")
        learns_rounding = isinstance(self.lkd, LKDSettings) and self.lkd.learn == "rounding"
        if learns_rounding and (self.method != "rtn" or self.scheme.mse):
            raise LowbitError(f"recipe '{self.name}': lkd_learn = \"rounding\" learns each weight's rounding and each "
                              "group's clip range, which the weight pass then stores as learnt: use method = \"rtn\" "
                              "and mse = false")
        if not (self.budget_bits >= 0 and math.isfinite(self.budget_bits)):
            raise LowbitError(f"recipe '{self.name}': budget_bits must be a positive number of stored bits per weight "
                              f"(e.g. 3.5), or 0 for none; got {self.budget_bits}")
        if self.budget_bits and not self.quantizes:
            raise LowbitError(f"recipe '{self.name}': budget_bits is for quantized weights; method 'fp' has none")
        if self.budget_bits and self.scheme.act_bits:
            raise LowbitError(f"recipe '{self.name}': a size budget plans weight-only formats; drop budget_bits, or "
                              "act_bits")
        for key, cls in (("scheme", Scheme), ("gptq", GPTQSettings), ("lkd", (LKDSettings, type(None)))):
            if not isinstance(getattr(self, key), cls):
                raise LowbitError(f"recipe '{self.name}': {key} must be a {getattr(cls, '__name__', 'LKDSettings')}, "
                                  f"got {getattr(self, key)!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.awq or self.budget_bits > 0

    @property
    def quantizes(self) -> bool:
        return self.method != "fp"

    def spec_for(self, layer: str, embedding: bool = False):
        """The QuantSpec for a layer name (a matmul, or the token embedding), or None when it stays float."""
        return self.scheme.spec_for(layer, embedding) if self.quantizes else None

    def describe(self) -> str:
        if not self.quantizes:
            return "float, no quantization"
        out = f"{self.method}: {self.scheme.describe()}"
        if self.method == "gptq":
            out += ", act-order + static groups" if self.gptq.act_order else ", column order"
        out = ("activation-aware scaling, then " if self.awq else "") + out
        out = (f"online rotations before {ONLINE_ROTATIONS[self.online_rotate]}, then " if self.online_rotate
               else "") + out
        out = ("rotations, then " if self.rotate else "") + out
        out += f", formats planned within {self.budget_bits:g} bits per weight" if self.budget_bits else ""
        if self.lkd is not None and self.lkd.learn == "rounding":
            return out + f", rounding learnt first ({self.lkd.steps} sign-gradient steps/block)"
        return out + (f", + LKD ({self.lkd.steps} steps/block)" if self.lkd else "")

    def to_dict(self) -> dict:
        """The flat form a recipe file is written in (``from_dict`` reads it back); the manifest records it."""
        out = {"name": self.name, "method": self.method}
        out.update({k: getattr(self.scheme, k) for k in SCHEME_KEYS})
        out.update({k: getattr(self.gptq, k) for k in GPTQ_KEYS})
        # absent when unset: other recipes' manifests stay as they were
        for key in ("awq", "rotate", "online_rotate", "budget_bits"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out["lkd"] = self.lkd is not None
        if self.lkd is not None:
            out.update({f"lkd_{k}": v for k, v in self.lkd.to_dict().items()})
        out["overrides"] = [{k: v for k, v in asdict(o).items() if v is not None} for o in self.scheme.overrides]
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "Recipe":
        """A Recipe from its flat form (a recipe file's keys), every key and type checked."""
        return _from_flat(dict(data), where or f"recipe '{data.get('name', 'custom')}'")


# The flat form: the scheme's and GPTQ's fields by name, LKD's as "lkd_<field>" with "lkd = true" to distil.
SCHEME_KEYS = tuple(f.name for f in fields(Scheme) if f.name != "overrides")
GPTQ_KEYS = tuple(f.name for f in fields(GPTQSettings))
LKD_KEYS = {f"lkd_{f.name}": f.name for f in fields(LKDSettings)}
_FIELDS = {"name", "method", "awq", "rotate", "online_rotate", "budget_bits", "lkd", "overrides", *SCHEME_KEYS,
           *GPTQ_KEYS, *LKD_KEYS}
_OVERRIDE_FIELDS = {f.name for f in fields(Override)}
_SCHEME_TYPES = field_types(Scheme)
_TYPES = {"name": str, "method": str, "awq": bool, "rotate": bool, "online_rotate": str, "budget_bits": float,
          "lkd": bool, "pattern": str,
          **_SCHEME_TYPES,
          **field_types(GPTQSettings), **{k: field_types(LKDSettings)[v] for k, v in LKD_KEYS.items()},
          **field_types(Override)}
_NOT_RECIPE_FIELDS = {
    "fuse": "'fuse' is not a recipe field: fusion is a compile option (lowbit compile --no-fuse, or "
            "lowbit.compile(..., fuse=False))"}


def _from_flat(data: dict, where: str) -> Recipe:
    for key, why in _NOT_RECIPE_FIELDS.items():
        if key in data:
            raise LowbitError(f"{where}: {why}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise LowbitError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(_FIELDS))}")
    raw_overrides = data.pop("overrides", [])
    check_types(where, data, _TYPES)
    if not isinstance(raw_overrides, list):
        raise LowbitError(f"{where}: 'overrides' must be an array of tables ([[overrides]])")
    overrides = tuple(_override(where, i, o) for i, o in enumerate(raw_overrides))
    lkd_given = sorted(k for k in data if k in LKD_KEYS)
    if lkd_given and not data.get("lkd", False):
        raise LowbitError(f"{where}: {', '.join(lkd_given)} set but lkd is not true; add lkd = true to distil, or "
                          "remove them")
    try:
        scheme = Scheme(**{k: data[k] for k in SCHEME_KEYS if k in data}, overrides=overrides)
        gptq = GPTQSettings(**{k: data[k] for k in GPTQ_KEYS if k in data})
        lkd = LKDSettings(**{LKD_KEYS[k]: data[k] for k in lkd_given}) if data.get("lkd") else None
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None
    recipe = Recipe(data.get("name", "custom"), data.get("method", "rtn"), scheme, gptq, lkd, data.get("awq", False),
                    data.get("rotate", False), float(data.get("budget_bits", 0.0)), data.get("online_rotate", ""))
    if recipe.awq and not recipe.quantizes:
        raise LowbitError(f"{where}: awq = true scales activations for quantized weights; method 'fp' has none")
    for key in ("rotate", "online_rotate"):
        if getattr(recipe, key) and not recipe.quantizes:
            raise LowbitError(f"{where}: {key} = {json.dumps(getattr(recipe, key))} rotates weights for their "
                              "quantization; method 'fp' has none")
    return recipe


def _builtin() -> dict[str, Recipe]:
    r = {"fp": Recipe("fp", method="fp")}
    for bits, group in [(8, 0), (8, 128), (4, 128), (4, 64), (4, 32), (3, 128), (3, 64), (2, 64)]:
        name = f"rtn-w{bits}" + (f"g{group}" if group else "")
        r[name] = Recipe(name, "rtn", Scheme(bits, group))
    # Symmetric INT4: the form TensorRT and ONNX Runtime run natively (no zero points).
    for group in (128, 64):
        r[f"rtn-w4g{group}-sym"] = Recipe(f"rtn-w4g{group}-sym", "rtn", Scheme(4, group, sym=True))
    for bits, group in [(4, 64), (3, 64)]:
        r[f"rtn-w{bits}g{group}-mse"] = Recipe(f"rtn-w{bits}g{group}-mse", "rtn", Scheme(bits, group, mse=True))
    # GPTQ: act-order + static groups by default (without act-order GPTQ can lose to RTN on Llama-family
    # models); "-noact" is the paper's plain column order with groups computed on the fly.
    for bits, group in [(8, 128), (4, 128), (4, 64), (3, 64), (2, 64)]:
        base = f"gptq-w{bits}g{group}"
        r[base] = Recipe(base, "gptq", Scheme(bits, group))
        r[f"{base}-noact"] = Recipe(f"{base}-noact", "gptq", Scheme(bits, group),
                                    GPTQSettings(act_order=False, static_groups=False))
        r[f"{base}-mse"] = Recipe(f"{base}-mse", "gptq", Scheme(bits, group, mse=True))
    # Symmetric GPTQ: what GPTQ checkpoints hold for vLLM (--target hf-gptq) and, at g32, GGUF's Q4_0 grid.
    for bits, group in [(8, 128), (4, 128), (4, 64), (4, 32)]:
        name = f"gptq-w{bits}g{group}-sym"
        r[name] = Recipe(name, "gptq", Scheme(bits, group, sym=True))
    # GGUF's Q4_0 file (llama.cpp's own layout): symmetric INT4 in groups of 32 for the block linears, the
    # embedding and head in Q8_0 (symmetric INT8, groups of 32), found by GPTQ or by RTN as llama.cpp's quantizer does.
    q8_0 = tuple(Override(p, bits=8) for p in ("*embed_tokens", "lm_head"))
    for method in ("gptq", "rtn"):
        r[f"{method}-q4_0"] = Recipe(f"{method}-q4_0", method, Scheme(4, 32, sym=True, quantize_lm_head=True,
                                                                      quantize_embeddings=True, overrides=q8_0))
    r["awq-gptq-q4_0"] = Recipe("awq-gptq-q4_0", "gptq", r["gptq-q4_0"].scheme, awq=True)
    # Activation-aware scaling (AWQ) folded into the graph, then RTN ("awq-") or GPTQ ("awq-gptq-"); "-sym" for
    # the exports that hold symmetric grids only (hf-gptq).
    for bits, group in [(4, 128), (4, 64), (3, 64), (2, 64)]:
        r[f"awq-w{bits}g{group}"] = Recipe(f"awq-w{bits}g{group}", "rtn", Scheme(bits, group), awq=True)
        r[f"awq-gptq-w{bits}g{group}"] = Recipe(f"awq-gptq-w{bits}g{group}", "gptq", Scheme(bits, group), awq=True)
    for group in (128, 64):
        name = f"awq-gptq-w4g{group}-sym"
        r[name] = Recipe(name, "gptq", Scheme(4, group, sym=True), awq=True)
    # Rotations of the residual stream and values folded into the weights (RMSNorm models), then GPTQ
    # ("rot-gptq-") or AWQ + GPTQ ("rot-awq-gptq-"). Not then RTN: on the demo LM rotated RTN w4g64 is 1.70x float
    # perplexity against RTN's 1.28x (docs/benchmarks.md).
    for bits, group in [(4, 128), (4, 64), (3, 64), (2, 64)]:
        for prefix, awq in (("rot-gptq", False), ("rot-awq-gptq", True)):
            name = f"{prefix}-w{bits}g{group}"
            r[name] = Recipe(name, "gptq", Scheme(bits, group), awq=awq, rotate=True)
    # Learnt rounding (AutoRound): each block's rounding offsets and clip ranges by sign-gradient descent on its
    # output error (on 256-token sequences of calibration text), then stored as learnt.
    for bits, group in [(4, 128), (4, 64), (3, 64), (2, 64)]:
        name = f"ar-w{bits}g{group}"
        r[name] = Recipe(name, "rtn", Scheme(bits, group), lkd=ROUNDING[4 if bits >= 4 else 3])
    # ZeroQuant. W8A8: symmetric per-channel INT8 weights, per-token dynamic INT8 activations. Mixed:
    # symmetric INT4 for the MLP/FC matmuls, INT8 for the attention projections (by module name:
    # Llama-family self_attn, GPT-2 attn, BERT attention), groups of 32 with the MSE clipping search (on
    # the demo LM, W4A8 perplexity 20.58 at g64 min/max -> 18.20; the demo encoder's cosine 0.971 -> 0.981),
    # with float or per-token INT8 activations. Each has an "-lkd" variant with distillation first.
    attention = tuple(Override(p, bits=8) for p in ATTENTION_PATTERNS)
    for name, scheme in [("zq-w8a8", Scheme(8, 0, sym=True, act_bits=8)),
                         ("zq-w4a16-mixed", Scheme(4, 32, sym=True, mse=True, overrides=attention)),
                         ("zq-w4a8-mixed", Scheme(4, 32, sym=True, mse=True, act_bits=8, overrides=attention))]:
        r[name] = Recipe(name, "rtn", scheme)
        r[name + "-lkd"] = Recipe(name + "-lkd", "rtn", scheme, lkd=LKDSettings())
    # W8A8 after the rotations: the residual stream's and the values' folded into the weights, and each MLP's product
    # rotated online before its down projection, so per-token INT8 sees no outlier channel.
    # "online-": every quantized matmul's input rotated at run time instead, for any architecture (Gemma-3, LayerNorm
    # models).
    r["rot-zq-w8a8"] = Recipe("rot-zq-w8a8", "rtn", r["zq-w8a8"].scheme, rotate=True, online_rotate="down")
    r["online-zq-w8a8"] = Recipe("online-zq-w8a8", "rtn", r["zq-w8a8"].scheme, online_rotate="all")
    return r


BUILTIN = _builtin()


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


def _override(where: str, i: int, o) -> Override:
    where = f"{where}, override #{i + 1}"
    if not isinstance(o, dict):
        raise LowbitError(f"{where} must be a table ([[overrides]] with pattern = \"...\"), got {o!r}")
    bad = set(o) - _OVERRIDE_FIELDS
    if bad or "pattern" not in o:
        raise LowbitError(f"{where} needs 'pattern' and only fields {', '.join(sorted(_OVERRIDE_FIELDS))} "
                          f"(got {', '.join(sorted(o))})")
    check_types(where, o, _TYPES)
    if not o["pattern"]:
        raise LowbitError(f"{where}: field 'pattern' must be a non-empty module-name glob, e.g. \"*.mlp.down_proj\"")
    return Override(**o)


def to_toml(recipe: Recipe) -> str:
    """The recipe as a file ``from_toml`` reads back to the same Recipe (its flat form, overrides as tables)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)              # a JSON string or number is a TOML one

    flat = recipe.to_dict()
    lines = [f"{k} = {value(v)}" for k, v in flat.items() if k != "overrides"]
    for o in flat["overrides"]:
        lines += ["", "[[overrides]]"] + [f"{k} = {value(v)}" for k, v in o.items()]
    return "\n".join(lines) + "\n"


def from_toml(path: Path) -> Recipe:
    data = _read_toml(path)
    data.setdefault("name", path.stem)
    return _from_flat(data, f"recipe file '{path}'")


def load_recipe(arg) -> Recipe:
    """A Recipe from a Recipe, a built-in name or a path to a .toml file."""
    if isinstance(arg, Recipe):
        return arg
    if arg in BUILTIN:
        return BUILTIN[arg]
    path = Path(arg)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise LowbitError(f"recipe file '{arg}' does not exist")
        return from_toml(path)
    raise LowbitError(f"unknown recipe '{arg}'; built-in recipes: {', '.join(BUILTIN)} (or a path to a .toml file)")
