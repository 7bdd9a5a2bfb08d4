"""An artifact's ONNX model in an ONNX Runtime session, in numpy: no torch. The core of the ``ort`` backend
(``ort_backend.OrtRunner`` adapts it to torch tensors) and of the torch-free engine (``lite.LiteEngine``).

Sessions run with all graph optimizations on. Inputs and outputs go through IO binding, so the KV cache a
step returns (``present.*``) stays in ONNX Runtime's memory (on the GPU with the CUDA provider) and is bound
as the next step's ``past_key_values.*`` without a copy through numpy; only the logits come back.

A graph whose every layer's attention is ``GroupQueryAttention`` (``compiler/ort_attention.py``) can also keep
its cache in place: ``start(batch, capacity)`` allocates buffers of ``capacity`` positions (``KVBuffers``) and
each step binds them as both past and present, so GroupQueryAttention writes the new keys / values into the
buffer at the step's slots and nothing is copied. A graph that concatenates its cache returns a longer one each
step, reading and writing the whole past (8.8 MiB per decode step on the demo LM at 192 positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from lowbit.errors import LowbitError
from lowbit.format import artifact
from lowbit.runtime.generation import mask_positions

_NO_SLOT_ROTARY = ("this artifact's GroupQueryAttention rotates by cache slot and its manifest does not record the "
                   "rotation; recompile it with --target onnx to batch requests continuously")
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


class KVBuffers(list):
    """A KV cache preallocated to ``capacity`` positions, written in place by the graph's GroupQueryAttention."""

    def __init__(self, values: list, capacity: int):
        super().__init__(values)
        self.capacity = capacity


class OrtSession:
    """One ONNX Runtime session over an artifact's ONNX model: ``start(batch)``, ``step(ids, mask, positions,
    cache)`` and ``encode(ids, mask)`` on int64 numpy arrays; logits / hidden states come back as float32 numpy."""

    def __init__(self, path: Path, manifest: dict, provider: str = "auto", threads: int = 0):
        info = manifest.get("onnx")
        # A TensorRT artifact's ONNX runs here too, its plugin nodes on their reference implementations: what
        # validates it on a machine without TensorRT.
        self.tensorrt = info is None and manifest.get("tensorrt") is not None
        if self.tensorrt:
            info = manifest["tensorrt"]
        if info is None:
            raise LowbitError(f"artifact '{path}' was compiled for target '{manifest.get('target')}' and has no ONNX "
                              "model; recompile it with --target onnx to use --backend ort")
        folder = "tensorrt" if self.tensorrt else "onnx"
        if not (isinstance(info, dict) and isinstance(info.get("file"), str)):
            raise LowbitError(f"artifact '{path}': the manifest's {folder} record names no model file; recompile it")
        # ONNX Runtime opens the model's external data itself (by names inside the model, kept in the model's
        # folder by ONNX Runtime): every file there must be listed, hence hashed.
        artifact.listed_folder(path, manifest, folder)
        file = artifact.member(path, manifest, f"{folder}/{info['file']}")
        if info.get("ops", {}).get("MatMulInteger") and "integer_matmuls" not in info:
            # Compiled before the check in integer_matmul: its uint8 x int8 GEMMs saturate on x86 without VNNI.
            raise LowbitError(f"artifact '{path}' has a W8A8 ONNX model from an older lowbit whose integer matmuls "
                              "give wrong results on x86 CPUs without VNNI; recompile it with --target onnx")
        self.file, self.threads = file, threads
        self.kv = info.get("kv_cache")
        self.kv_dtype = (self.kv or {}).get("dtype", info.get("precision", "float32"))
        self.session = self.new_session(pick_providers(provider))
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == PROVIDERS["cuda"] else "cpu"
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.task = manifest["source"]["task"]
        # GroupQueryAttention decides per call: past and present in one buffer means write in place.
        fused = info.get("fusions", {}).get("GroupQueryAttention") or 0
        self.in_place_cache = bool(self.kv) and fused == self.kv["layers"]
        # GroupQueryAttention rotates by cache slot: moving rows' cache to other slots needs their keys rotated.
        self.slot_rotary = _slot_rotary(info) if fused else None
        self.slot_rotary_missing = bool(fused) and (self.slot_rotary is None or not self.in_place_cache)
        # Continuous batching keeps such a cache in host buffers, one row per request (runtime.kv_rows.SlotRows).
        self.host_slots = self.in_place_cache and self.device == "cpu"

    def new_session(self, providers: list, profile_prefix: Optional[str] = None,
                    optimized_model: Optional[str] = None):
        """An InferenceSession of the artifact's model (all graph optimizations); ``profile_prefix``: with ONNX
        Runtime's profiling on, its JSON trace named from this prefix; ``optimized_model``: where to save the graph
        as optimized for this session (the node names the trace uses)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3            # errors only: ORT warns about every CPU fallback node
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if profile_prefix:
            opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
        if optimized_model:
            opts.optimized_model_filepath = optimized_model
        model = str(self.file)
        if self.tensorrt:
            import onnx

            try:
                from lowbit.kernels.tensorrt import reference
            except ImportError as e:
                raise LowbitError(f"a TensorRT artifact's ONNX runs in ONNX Runtime with lowbit's plugins on their "
                                  f"reference implementations, which need {e.name}; install it") from None

            # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, by default with INT8 activations
            # (accuracy level 4): level 0 keeps the float math TensorRT's weight-only GEMMs do.
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            # The Python ops are defined before the library that serves them is loaded.
            model = reference.ort_model(onnx.load(model), self.kv_dtype).SerializeToString()
            reference.session_options(base=opts)
        try:
            return ort.InferenceSession(model, opts, providers=providers)
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception types, or RuntimeError)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"ONNX Runtime cannot load '{self.file}': {first[:300]}; recompile the artifact") from None

    def _run(self, feeds: dict, outputs_in: Optional[dict] = None) -> list:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.outputs:
            if outputs_in and name in outputs_in:
                binding.bind_ortvalue_output(name, outputs_in[name])
            else:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _check_inputs(self, needed: list[str]):
        missing = [n for n in needed if n not in self.inputs]
        if missing:
            raise LowbitError(f"the ONNX model lacks input(s) {', '.join(missing)}; recompile the artifact")

    def start(self, batch: int, capacity: int = 0) -> list:
        """An empty KV cache for ``batch`` sequences: buffers of ``capacity`` positions written in place
        (``KVBuffers``) when the graph can and a capacity is given, else a cache of length 0 that each step
        returns extended."""
        import onnxruntime as ort

        length = capacity if capacity and self.in_place_cache else 0
        # Artifacts from before value_dim was recorded have values as wide as keys.
        values = self.kv.get("value_dim", self.kv["head_dim"])
        cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, length, d), self.kv_dtype), self.device, 0)
                 for h, dk, dv in zip(self.kv["kv_heads"], self.kv["head_dim"], values) for d in (dk, dv)]
        return KVBuffers(cache, length) if length else cache

    def step_np(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """Logits [B, S, V] for ``input_ids`` after ``cache``, with the extended cache (the same buffers, filled
        further, for ``KVBuffers``)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        feeds.update(zip(self.inputs[3:], cache))
        if isinstance(cache, KVBuffers):
            if attention_mask.shape[1] > cache.capacity:
                raise LowbitError(f"the KV cache holds {cache.capacity} positions and this step needs "
                                  f"{attention_mask.shape[1]}; start it with a larger capacity")
            outs = self._run(feeds, dict(zip(self.outputs[1:], cache)))
            return outs[0].numpy().astype(np.float32, copy=False), cache
        outs = self._run(feeds)
        return outs[0].numpy().astype(np.float32, copy=False), outs[1:]

    # ---- continuous batching (runtime.batcher) --------------------------------------------------
    def cache_rows(self, cache: list, rows: list[int], left: int = 0, width: Optional[int] = None,
                   capacity: int = 0) -> list:
        """The cache of ``rows`` (its first ``width`` slots), with ``left`` empty slots added at the front (``left``
        < 0: dropped); with ``capacity`` (a graph that writes its cache in place), in buffers of that many slots.
        Keys in a graph that rotates by slot are rotated by the move, so every row keeps its positions."""
        import onnxruntime as ort

        if left and self.slot_rotary_missing:
            raise LowbitError(_NO_SLOT_ROTARY)
        out = []
        for i, value in enumerate(cache):
            a = (value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value))[rows][:, :, :width]
            a = a[:, :, -left:] if left < 0 else a
            slots = a.shape[2] + max(left, 0)
            if capacity and slots > capacity:
                raise LowbitError(f"a cache of {slots} slots does not fit a capacity of {capacity}")
            # One copy into the new buffer, keys rotated in place there.
            dst = np.zeros(a.shape[:2] + (capacity or slots, a.shape[3]), a.dtype)
            dst[:, :, max(left, 0):slots] = a
            if left and self.slot_rotary is not None and i % 2 == 0:
                rotate_slots(dst[:, :, max(left, 0):slots], left, self.slot_rotary)
            out.append(ort.OrtValue.ortvalue_from_numpy(dst, self.device, 0))
        return KVBuffers(out, capacity) if capacity else out

    def slot_buffers(self, rows: int, capacity: int) -> list[np.ndarray]:
        """Host buffers [rows, heads, capacity, dim] for a cache of ``rows`` sequences (``slot_view`` binds them)."""
        values = self.kv.get("value_dim", self.kv["head_dim"])
        return [np.zeros((rows, h, capacity, d), self.kv_dtype)
                for h, dk, dv in zip(self.kv["kv_heads"], self.kv["head_dim"], values) for d in (dk, dv)]

    def slot_view(self, buffers: list[np.ndarray], rows: int) -> KVBuffers:
        """The first ``rows`` rows of host ``buffers`` as a cache the graph writes in place: ONNX Runtime's CPU
        tensors over the same memory (a row-major prefix of rows is contiguous)."""
        import onnxruntime as ort

        view = KVBuffers([ort.OrtValue.ortvalue_from_numpy(b[:rows], "cpu", 0) for b in buffers], buffers[0].shape[2])
        view.host = buffers
        return view

    def slot_copy(self, dst: list[np.ndarray], dst_rows: list[int], dst_start: int, src: list[np.ndarray],
                  src_rows: list[int], src_start: int, length: int) -> None:
        """Slots [src_start, + length) of ``src``'s rows into slots from ``dst_start`` of ``dst``'s rows (host
        buffers, the same ones allowed), keys rotated by the move in a graph that rotates by slot."""
        shift = dst_start - src_start
        if shift and self.slot_rotary_missing:
            raise LowbitError(_NO_SLOT_ROTARY)
        for i, (d, s) in enumerate(zip(dst, src)):
            block = s[src_rows, :, src_start:src_start + length]           # a copy: moves may overlap
            if shift and self.slot_rotary is not None and i % 2 == 0:
                rotate_slots(block, shift, self.slot_rotary)
            d[dst_rows, :, dst_start:dst_start + length] = block

    def cache_concat(self, caches: list) -> list:
        """Caches of the same width (or capacity), one after another along the batch."""
        import onnxruntime as ort

        out = [ort.OrtValue.ortvalue_from_numpy(np.concatenate([v.numpy() for v in values]), self.device, 0)
               for values in zip(*caches)]
        return KVBuffers(out, caches[0].capacity) if isinstance(caches[0], KVBuffers) else out

    def full_np(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits of a causal LM over whole sequences (empty cache), or an encoder's last hidden state."""
        if self.task == "encoder":
            self._check_inputs(["input_ids", "attention_mask"])
            return self._run({"input_ids": input_ids.astype(np.int64),
                              "attention_mask": attention_mask.astype(np.int64)})[0].numpy().astype(np.float32, copy=False)
        return self.step_np(input_ids, attention_mask, mask_positions(attention_mask),
                            self.start(input_ids.shape[0]))[0]


def _slot_rotary(info: dict):
    """The manifest's ``slot_rotary`` (GroupQueryAttention's inv_freq) as float32, or None when absent or
    malformed."""
    inv = info.get("slot_rotary")
    if not (isinstance(inv, list) and 0 < len(inv) <= 4096 and all(isinstance(f, float) for f in inv)):
        return None
    inv = np.asarray(inv, np.float32)
    return inv if np.isfinite(inv).all() else None


def rotate_slots(keys: np.ndarray, shift: int, inv_freq: np.ndarray) -> np.ndarray:
    """Keys [B, H, T, D] rotated in place by ``shift`` slots (the half-split rotary of the first
    2 x len(inv_freq) dims, as GroupQueryAttention applies it): R(s + shift) = R(shift) R(s). Returns ``keys``."""
    half = len(inv_freq)
    angle = np.float64(shift) * inv_freq.astype(np.float64)
    cos, sin = np.cos(angle).astype(keys.dtype), np.sin(angle).astype(keys.dtype)
    a, b = keys[..., :half].copy(), keys[..., half:2 * half]
    keys[..., :half] = a * cos - b * sin
    keys[..., half:2 * half] = b * cos + a * sin
    return keys
