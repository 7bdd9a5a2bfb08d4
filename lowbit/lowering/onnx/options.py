"""The ``onnx`` target's options (no torch: the CLI derives its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.options import check_choice, option

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EXPORTERS = ("lowbit", "torch.onnx")


@dataclass(frozen=True)
class OnnxOptions:
    accuracy_level: int = option(0, "MatMulNBits accuracy_level: 0 exact float math, 4 int8 activations inside the "
                                 "kernel (faster on CPU, less exact)", "--onnx-accuracy-level", "onnx_accuracy_level",
                                 metavar="N")
    fusions: bool = option(True, "keep the plain ops instead of ONNX Runtime's fused ones "
                           "(SkipSimplifiedLayerNormalization, Gelu, ...)", "--no-onnx-fusions", "onnx_fusions",
                           negate=True)
    exporter: str = option("lowbit", "lowbit writes the shipped graph as ONNX itself, in seconds, and falls back to "
                           "torch.onnx for an op it does not know; torch.onnx always re-traces with it",
                           "--onnx-exporter", "onnx_exporter", metavar="NAME")

    def __post_init__(self):
        check_choice(self.accuracy_level, ACCURACY_LEVELS, "--onnx-accuracy-level",
                     "0: float math, exact; 4: int8 activations inside MatMulNBits, faster, less exact")
        check_choice(self.exporter, EXPORTERS, "--onnx-exporter")
        if not isinstance(self.fusions, bool):
            raise LowbitError(f"onnx_fusions must be true or false, not {self.fusions!r}")

