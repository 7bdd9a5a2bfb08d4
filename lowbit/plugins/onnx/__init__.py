"""ONNX Runtime translations of lowbit's ops, used by ``compiler.lower_onnx``.

Lowering swaps each quantized module for one holding its tensors in the layout an ONNX Runtime operator
reads (repacked once, at compile time) and calling a ``lowbit::ort_*`` op that maps 1:1 onto that
operator or a small standard-op subgraph. Each ``ort_*`` op has a torch reference kernel implementing the
ONNX Runtime semantics, so the repacking is testable without exporting.

- ``ort_matmul_nbits``  -> ``com.microsoft::MatMulNBits`` (weight-only INT2..INT8, 4- or 8-bit containers)
- ``ort_matmul_a8``     -> per-token INT8 quantization + ``MatMulInteger`` + row/column rescale (W8A8)
- ``ort_gather_nbits``  -> ``com.microsoft::GatherBlockQuantized`` (quantized token embedding)
"""

from lowbit.plugins.onnx.ort_ops import for_onnx, translations  # noqa: F401
