"""ONNX Runtime forms of lowbit's ops, used by ``compiler.lower_onnx``.

Lowering rewrites the shipped program's quantized ops into ``lowbit::ort_*`` ops whose tensors are in the
layout an ONNX Runtime operator reads (repacked once, at compile time; ``ort_ops``), each with a torch
reference kernel implementing the ONNX Runtime semantics, so the repacking is testable without exporting.
``translations`` maps those, and lowbit's other ops, onto ONNX nodes.
"""

from lowbit.plugins.onnx.translations import translations  # noqa: F401
