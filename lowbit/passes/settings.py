"""The typed parts of a recipe: the quantization ``Scheme`` (what the weights and activations become), and each
algorithm's settings, ``GPTQSettings`` and ``LKDSettings`` (how the passes get there). Frozen, checked on
construction, each default stated once here. ``LKDSettings`` fields are also ``lowbit.options`` fields: the CLI
derives its ``--lkd-*`` flags from them, so this module stays torch-free."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.options import option

HEAD_NAMES = ("lm_head",)
HESSIAN_DTYPES = ("float32", "float64")
LKD_DATA = ("calib", "random")
LKD_LOSSES = ("token", "mse")
LKD_INPUTS = ("quantized", "float")
LKD_LEARN = ("weights", "rounding")


@dataclass(frozen=True)
class Override:
    """Per-layer changes to the scheme for module names matching ``pattern`` (a glob); ``skip`` keeps them float."""
    pattern: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    act_bits: Optional[int] = None
    skip: bool = False

    def changes(self) -> dict:
        return {k: getattr(self, k) for k in ("bits", "group_size", "sym", "act_bits") if getattr(self, k) is not None}


@dataclass(frozen=True)
class Scheme:
    """What the quantized model stores and computes with, layer by layer (first matching override wins)."""
    bits: int = 4
    group_size: int = 128             # <= 0: one group per output channel
    sym: bool = False
    act_bits: int = 0                 # 8: per-token dynamic INT8 activations (W8A8); needs sym weights
    mse: bool = False                 # clipping search for group scales (RTN and GPTQ)
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False
    overrides: tuple[Override, ...] = ()

    def __post_init__(self):
        from lowbit.format.quantize import ACT_BITS, MAX_BITS, MIN_BITS

        object.__setattr__(self, "overrides", tuple(self.overrides))
        for who, bits, group in [("", self.bits, self.group_size)] + [
                (f"override '{o.pattern}': ", o.bits, o.group_size) for o in self.overrides]:
            if bits is not None and not (MIN_BITS <= bits <= MAX_BITS):
                raise LowbitError(f"{who}bits={bits} is out of range; valid: {MIN_BITS}..{MAX_BITS}")
            if group is not None and 0 < group < 8:
                raise LowbitError(f"{who}group_size={group} is too small; use >= 8, or <= 0 for per-channel")
        for o in self.overrides:
            if not isinstance(o, Override):
                raise LowbitError(f"overrides must be Override objects, got {o!r}")
        for who, act, sym in [("", self.act_bits, self.sym)] + [
                (f"override '{o.pattern}': ", self.act_bits if o.act_bits is None else o.act_bits,
                 self.sym if o.sym is None else o.sym) for o in self.overrides if not o.skip]:
            if act not in ACT_BITS:
                raise LowbitError(f"{who}act_bits={act}; valid: {', '.join(map(str, ACT_BITS))} "
                                  "(0 keeps activations float)")
            if act and not sym:
                raise LowbitError(f"{who}act_bits={act} needs symmetric weights (sym = true) so both matmul operands "
                                  "are plain integers")

    def spec_for(self, layer: str, embedding: bool = False):
        """The QuantSpec for a layer name (a matmul, or the token embedding), or None when it stays float."""
        from lowbit.format.quantize import QuantSpec

        if embedding and not self.quantize_embeddings:
            return None
        if layer in HEAD_NAMES and not self.quantize_lm_head:
            return None
        spec = QuantSpec(self.bits, self.group_size, self.sym, self.act_bits)
        for o in self.overrides:
            if fnmatch.fnmatchcase(layer, o.pattern):
                return None if o.skip else replace(spec, **o.changes())
        return spec

    def describe(self) -> str:
        out = (f"{self.bits}-bit, " + ("per-channel" if self.group_size <= 0 else f"group {self.group_size}")
               + (", symmetric" if self.sym else ", asymmetric"))
        out += f", INT{self.act_bits} per-token activations" if self.act_bits else ""
        out += "".join(f", {o.pattern}: w{o.bits}" for o in self.overrides if o.bits and not o.skip)
        return out + (", MSE clipping" if self.mse else "")


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ's own settings (method = "gptq")."""
    act_order: bool = True            # columns by decreasing Hessian diagonal
    static_groups: bool = True        # group params fixed up front: contiguous groups, no g_idx
    damp: float = 0.01                # dampening, fraction of the Hessian's mean diagonal
    block: int = 128                  # lazy batch width
    hessian_dtype: str = "float32"

    def __post_init__(self):
        if not (0 < self.damp < 10):
            raise LowbitError(f"damp={self.damp} is out of range; valid: 0 < damp < 10")
        if self.block < 1:
            raise LowbitError(f"block={self.block} must be >= 1")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise LowbitError(f"hessian_dtype '{self.hessian_dtype}'; valid: {', '.join(HESSIAN_DTYPES)}")


@dataclass(frozen=True)
class LKDSettings:
    """Layer-by-layer distillation before the weight pass (passes/lkd.py). A recipe file sets them as ``lkd_*``
    keys, the command line as ``--lkd-*`` flags, ``lowbit.compile`` as ``lkd={...}`` (field names)."""
    steps: int = option(100, "LKD: optimizer steps per block", "--lkd-steps", "lkd_steps", metavar="N")
    lr: float = option(0.0, "LKD: learning rate; 0 picks 1e-4 for learn=weights (Adam) and 1/steps for "
                       "learn=rounding (the first sign-gradient step, in grid steps)", "--lkd-lr", "lkd_lr",
                       metavar="LR")
    batch: int = option(4, "LKD: sequences per step", "--lkd-batch", "lkd_batch", metavar="N")
    data: str = option("calib", "LKD data: calib (the --calib text) or random token ids", "--lkd-data", "lkd_data",
                       metavar="SOURCE")
    samples: int = option(32, "LKD: sequences distilled on", "--lkd-samples", "lkd_samples", metavar="N")
    seq_len: int = option(256, "LKD: tokens per sequence", "--lkd-seq-len", "lkd_seq_len", metavar="N")
    seed: int = option(0, "LKD: seed for the sequences and the student", "--lkd-seed", "lkd_seed", metavar="N")
    loss: str = option("token", "LKD loss: token (each token's squared error relative to its energy) or mse",
                       "--lkd-loss", "lkd_loss", metavar="LOSS")
    inputs: str = option("quantized", "LKD: the student's block input: quantized (the distilled blocks' output) or "
                         "float (the float model's)", "--lkd-inputs", "lkd_inputs", metavar="FROM")
    learn: str = option("weights", "LKD: what each block learns: weights (Adam on the float weights, on a fixed grid) "
                        "or rounding (sign-gradient descent on each weight's rounding and each group's clip range, "
                        "AutoRound)", "--lkd-learn", "lkd_learn", metavar="WHAT")

    def __post_init__(self):
        def bad(name: str, need: str):
            flag = next(f.metadata["flag"] for f in fields(self) if f.name == name)
            raise LowbitError(f"lkd_{name}={getattr(self, name)!r} ({flag}): {need}")

        for name, low in (("steps", 1), ("batch", 1), ("samples", 1), ("seq_len", 2), ("seed", 0)):
            if getattr(self, name) < low:
                bad(name, f"must be >= {low}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            bad("lr", "must be a finite number >= 0 (0: automatic)")
        for name, valid in (("data", LKD_DATA), ("loss", LKD_LOSSES), ("inputs", LKD_INPUTS), ("learn", LKD_LEARN)):
            if getattr(self, name) not in valid:
                bad(name, f"valid: {', '.join(valid)}")

    @property
    def rate(self) -> float:
        """The learning rate used: ``lr``, or when 0 Adam's 1e-4 on weights, AutoRound's 1/steps on rounding."""
        return self.lr or (1e-4 if self.learn == "weights" else 1 / self.steps)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_types(where: str, table: dict, types: dict) -> None:
    """Refuse a value of ``table`` whose type is not ``types[key]`` (keys it lacks pass), in one line; an int where
    a float is wanted becomes that float, in place (TOML and JSON write 1 for 1.0)."""
    for key, value in table.items():
        want = types.get(key)
        if want is float and type(value) is int:
            value = table[key] = float(value)
        if want is not None and type(value) is not want:
            raise LowbitError(f"{where}: field '{key}' must be {want.__name__}, got {value!r}")


def field_types(cls) -> dict:
    """{field: type} of the fields of ``cls`` whose default is a plain value, for checking what TOML gave."""
    return {f.name: type(f.default) for f in fields(cls)
            if f.default is not MISSING and f.default is not None and type(f.default) in (bool, int, float, str)}
