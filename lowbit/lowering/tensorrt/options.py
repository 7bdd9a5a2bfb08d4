"""The ``tensorrt`` target's options (no torch: the CLI derives its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.options import check_choice, option

PRECISIONS = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class TensorRTOptions:
    precision: str = option("float16", "the float type of the TensorRT ONNX (and engine): float16, bfloat16 or "
                            "float32", "--trt-precision", "trt_precision", metavar="DTYPE")

    def __post_init__(self):
        check_choice(self.precision, PRECISIONS, "--trt-precision")
