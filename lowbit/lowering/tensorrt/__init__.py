"""The TensorRT target: the shipped program as tensorrt/model.onnx in TensorRT's dialect (lower.py), checked against
onnx-tensorrt's operator support (tensorrt_ops.py)."""
