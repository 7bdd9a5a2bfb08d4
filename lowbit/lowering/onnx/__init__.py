"""The ONNX Runtime target: the shipped program as onnx/model.onnx (lower.py), written by lowbit's emitter (fx_onnx.py),
with ONNX Runtime's operator forms (ort_ops.py, translations.py, integer_matmul.py) and fused-op rewrites."""
