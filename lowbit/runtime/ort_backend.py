"""ONNX Runtime backend: run an artifact's ``onnx/model.onnx`` (see ``compiler.lower_onnx`` for its inputs).

Sessions run with all graph optimizations on. Inputs and outputs go through IO binding, so the KV cache a
step returns (``present.*``) stays in ONNX Runtime's memory (on the GPU with the CUDA provider) and is bound
as the next step's ``past_key_values.*`` without a copy through numpy; only the logits come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.format.graph import mask_positions

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def pick_providers(requested: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``auto`` (CUDA when the installed onnxruntime has it), ``cpu`` or ``cuda``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
    if requested not in PROVIDERS:
        raise LowbitError(f"unknown ONNX Runtime provider '{requested}'; valid: auto, {', '.join(PROVIDERS)}")
    if PROVIDERS[requested] not in available:
        hint = " (install onnxruntime-gpu for CUDA)" if requested == "cuda" else ""
        raise LowbitError(f"ONNX Runtime provider {PROVIDERS[requested]} is not available{hint}; this onnxruntime "
                          f"has {', '.join(available)}")
    return [PROVIDERS[requested]] + ([PROVIDERS["cpu"]] if requested != "cpu" else [])


class OrtRunner:
    """One ONNX Runtime session over an artifact's ONNX model, with the Engine's runner interface."""

    @classmethod
    def open(cls, path: Path, manifest: dict, device="cpu", dtype=torch.float32, explicit_dtype=False,
             provider: str = "auto", threads: int = 0, **_) -> "OrtRunner":
        """The runner of an artifact (``targets`` backend entry point)."""
        if device != "cpu" or (explicit_dtype and dtype != torch.float32):
            raise LowbitError("--device and --dtype apply to the torch backend; ONNX Runtime runs the exported "
                              "graph's dtype where its --provider says (cpu or cuda)")
        return cls(path, manifest, provider, threads)

    def __init__(self, path: Path, manifest: dict, provider: str = "auto", threads: int = 0):
        import onnxruntime as ort

        info = manifest.get("onnx")
        if info is None:
            raise LowbitError(f"artifact '{path}' was compiled for target '{manifest.get('target')}' and has no ONNX "
                              "model; recompile it with --target onnx to use --backend ort")
        file = path / "onnx" / info["file"]
        if info.get("ops", {}).get("MatMulInteger") and "integer_matmuls" not in info:
            # Compiled before the check in integer_matmul: its uint8 x int8 GEMMs saturate on x86 without VNNI.
            raise LowbitError(f"artifact '{path}' has a W8A8 ONNX model from an older lowbit whose integer matmuls "
                              "give wrong results on x86 CPUs without VNNI; recompile it with --target onnx")
        providers = pick_providers(provider)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3            # errors only: ORT warns about every CPU fallback node
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(file), opts, providers=providers)
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception types, or RuntimeError)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"ONNX Runtime cannot load '{file}': {first[:300]}; recompile the artifact") from None
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == PROVIDERS["cuda"] else "cpu"
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.kv = info.get("kv_cache")
        self.task = manifest["source"]["task"]

    # ---- plumbing --------------------------------------------------------------------------
    def _run(self, feeds: dict) -> list:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _check_inputs(self, needed: list[str]):
        missing = [n for n in needed if n not in self.inputs]
        if missing:
            raise LowbitError(f"the ONNX model lacks input(s) {', '.join(missing)}; recompile the artifact")

    # ---- runner interface (see engine.Engine) ----------------------------------------------
    def start(self, batch: int) -> list:
        """An empty KV cache (past length 0) for ``batch`` sequences."""
        import onnxruntime as ort

        # Artifacts from before value_dim was recorded have values as wide as keys.
        values = self.kv.get("value_dim", self.kv["head_dim"])
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, 0, d), np.float32), self.device, 0)
                for h, dk, dv in zip(self.kv["kv_heads"], self.kv["head_dim"], values) for d in (dk, dv)]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: list) -> tuple[torch.Tensor, list]:
        """Logits [B, S, V] for ``input_ids`` after ``cache``; returns them with the extended cache."""
        feeds = {"input_ids": _np(input_ids), "attention_mask": _np(attention_mask), "position_ids": _np(position_ids)}
        feeds.update(zip(self.inputs[3:], cache))
        outs = self._run(feeds)
        return torch.from_numpy(outs[0].numpy()), outs[1:]

    def full(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of a causal LM over whole sequences (empty cache), or an encoder's last hidden state."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "encoder":
            self._check_inputs(["input_ids", "attention_mask"])
            outs = self._run({"input_ids": _np(input_ids), "attention_mask": _np(attention_mask)})
            return torch.from_numpy(outs[0].numpy())
        logits, _ = self.step(input_ids, attention_mask, mask_positions(attention_mask), self.start(input_ids.shape[0]))
        return logits


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.int64).cpu().numpy()
