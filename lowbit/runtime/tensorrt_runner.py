"""TensorRT backend: run an artifact's engine (``tensorrt/model.engine``, built by ``lowbit build-engine``) with the
Engine's runner interface, on torch CUDA tensors.

The KV cache stays on the GPU: each step binds the previous step's ``present.*`` tensors as ``past_key_values.*``
without a copy. Prefill (no cache) runs in the engine's optimization profile 0 and decode in profile 1, each in
its own execution context, so switching costs nothing (``kernels.tensorrt.engine.profiles``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.format.artifact import TENSORRT_ENGINE_FILE, member

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TensorRTRunner:
    """One deserialized engine and an execution context per optimization profile."""

    def __init__(self, path: Path, manifest: dict):
        from lowbit.kernels.tensorrt.engine import require_tensorrt

        trt = require_tensorrt()
        from lowbit.kernels.tensorrt import qdp  # noqa: F401  (plugin definitions the engine's nodes resolve to)

        info = manifest["tensorrt"]
        self.info, self.task = info, manifest["source"]["task"]
        self.kv = info.get("kv_cache")
        self.dtype = _DTYPES[info["precision"]]
        self.device = torch.device("cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(member(path, manifest, TENSORRT_ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise LowbitError(f"TensorRT cannot load the engine of '{path}' (built by another TensorRT version or for "
                              "another GPU?); rebuild it with 'lowbit build-engine'")
        self.contexts = []
        stream = torch.cuda.current_stream().cuda_stream
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, stream)
            self.contexts.append(ctx)
        self.inputs, self.outputs = info["inputs"], info["outputs"]
        self._empty = torch.empty(16, device=self.device)

    @classmethod
    def open(cls, path: Path, manifest: dict, device="cuda", dtype=None, explicit_dtype=False, **_) -> "TensorRTRunner":
        """The runner of an artifact (``targets`` backend entry point)."""
        if manifest.get("tensorrt") is None:
            raise LowbitError(f"artifact '{path}' has no TensorRT model; recompile it with --target tensorrt")
        if TENSORRT_ENGINE_FILE not in manifest["files"] and not (path / TENSORRT_ENGINE_FILE).exists():
            raise LowbitError(f"artifact '{path}' has no TensorRT engine yet; build it on this machine with "
                              f"'lowbit build-engine {path}', or run its ONNX in ONNX Runtime with --backend ort")
        member(path, manifest, TENSORRT_ENGINE_FILE)          # an engine the manifest does not hash is never read
        if not torch.cuda.is_available():
            raise LowbitError("--backend tensorrt needs an NVIDIA GPU and torch with CUDA; none is available here")
        if explicit_dtype and dtype != _DTYPES[manifest["tensorrt"]["precision"]]:
            raise LowbitError(f"the engine computes in {manifest['tensorrt']['precision']}; recompile with "
                              "--trt-precision to change it")
        return cls(path, manifest)

    def start(self, batch: int, capacity: int = 0) -> list:
        """An empty KV cache (length 0) on the GPU; each step returns it extended."""
        values = self.kv["value_dim"]
        return [torch.empty((batch, h, 0, d), dtype=self.dtype, device=self.device)
                for h, dk, dv in zip(self.kv["kv_heads"], self.kv["head_dim"], values) for d in (dk, dv)]

    def _execute(self, profile: int, feeds: dict) -> dict:
        ctx = self.contexts[profile]
        feeds = {k: v.contiguous() for k, v in feeds.items()}
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            # An empty tensor (prefill's past) has no memory; TensorRT still wants a valid address.
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = self.dtype if name != "logits" or self.dtype != torch.float32 else torch.float32
            outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise LowbitError("TensorRT failed to run the engine; rerun with a verbose TensorRT log")
        return outs

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: list) -> tuple[torch.Tensor, list]:
        """Logits [B, S, V] (float32) for ``input_ids`` after ``cache``; returns them with the extended cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = {k: v.to(self.device, torch.int64) for k, v in feeds.items()}
        feeds.update(zip(self.inputs[3:], (c.to(self.device, self.dtype) for c in cache)))
        profile = 0 if cache[0].shape[2] == 0 else 1
        outs = self._execute(profile, feeds)
        return outs["logits"].float(), [outs[n] for n in self.outputs[1:]]

    def full(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of a causal LM over whole sequences (empty cache), or an encoder's last hidden state."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "encoder":
            feeds = {"input_ids": input_ids.to(self.device, torch.int64),
                     "attention_mask": attention_mask.to(self.device, torch.int64)}
            return self._execute(0, feeds)["last_hidden_state"].float()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.step(input_ids, attention_mask, positions, self.start(input_ids.shape[0]))[0]
