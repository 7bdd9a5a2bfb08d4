"""Lowerings: the quantized, fused graph to a target's files (program.py for the torch runtime, onnx/, tensorrt/,
hf_gptq.py); targets.py names each target's lowering."""
