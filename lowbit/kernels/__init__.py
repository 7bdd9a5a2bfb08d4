"""Kernels behind the lowbit:: ops: cpu (torch's int4 / int8 packed layouts), triton (CUDA), tensorrt (plugins)."""
