"""Building a TensorRT engine from an artifact's ``tensorrt/model.onnx`` (TensorRT's Python API, >= 10.7).

The network is strongly typed (the ONNX model's types are the engine's: INT4 weight-only GEMMs where it
dequantizes INT4, the plugins' INT8, float16 / bfloat16 elsewhere), parsed with lowbit's plugins registered
(``qdp``). A causal LM gets two optimization profiles, one per step kind the runtime executes:

- ``prefill`` (profile 0): batch 1..B, new tokens 1..S, no cache (past length 0);
- ``decode`` (profile 1): batch 1..B, one new token, past length 1..P;

an encoder one profile over batch and sequence. A timing cache makes rebuilds fast; the engine, the build log
and the cache go into the artifact (``lowbit build-engine``, ``tools/build_engine.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

MIN_VERSION = (10, 7)            # tensorrt.plugin with AOT implementations


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8
    max_new_tokens: int = 512       # tokens of one prefill step
    max_past: int = 2048            # cached tokens of a decode step


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line error naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise LowbitError("TensorRT is not installed here: install it (pip install tensorrt, TensorRT >= 10.7, on a "
                          "machine with an NVIDIA GPU) and run this again") from None
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        raise LowbitError(f"TensorRT {trt.__version__} is too old: lowbit's plugins need tensorrt.plugin with AOT "
                          f"implementations, TensorRT >= {'.'.join(map(str, MIN_VERSION))}")
    return trt


def profiles(io: dict, limits: Limits) -> list[dict]:
    """Per optimization profile, {input: (min, opt, max) shapes} for the artifact's ONNX inputs (``io``: the
    manifest's ``tensorrt`` entry)."""
    b = (1, 1, limits.max_batch)
    s_opt = min(128, limits.max_new_tokens)
    if io.get("kv_cache") is None:
        seq = (1, s_opt, limits.max_new_tokens)
        return [{"input_ids": tuple(zip(b, seq)), "attention_mask": tuple(zip(b, seq))}]
    kv = io["kv_cache"]
    past = io["inputs"][3:]
    dims = [(h, d) for h, dk, dv in zip(kv["kv_heads"], kv["head_dim"], kv["value_dim"]) for d in (dk, dv)]

    def profile(new, cached):
        total = tuple(n + c for n, c in zip(new, cached))
        return {"input_ids": tuple(zip(b, new)), "attention_mask": tuple(zip(b, total)),
                "position_ids": tuple(zip(b, new)),
                **{name: tuple((bb, h, c, d) for bb, c in zip(b, cached)) for name, (h, d) in zip(past, dims)}}

    p_opt = min(256, limits.max_past)
    return [profile((1, s_opt, limits.max_new_tokens), (0, 0, 0)),
            profile((1, 1, 1), (1, p_opt, limits.max_past))]


class _Log:
    """A TensorRT logger that keeps every line for the build log and prints errors."""

    def __init__(self, trt):
        outer = self

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                outer.lines.append(f"[{severity.name}] {msg}")

        self.lines: list[str] = []
        self.logger = Logger()


def build_engine(onnx_path: Path, io: dict, limits: Limits, cache: bytes | None = None, aot: bool = True) -> dict:
    """Parse and build; returns {engine (bytes), timing_cache (bytes), log (str), seconds, profiles}. Raises
    LowbitError with the parser's or builder's first error."""
    trt = require_tensorrt()
    from lowbit.kernels.tensorrt import qdp  # noqa: F401  (registers lowbit's plugins with TensorRT)

    log = _Log(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(log.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    data = _with_aot(onnx_path, aot)
    ok = parser.parse(data, str(onnx_path)) if isinstance(data, bytes) else parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LowbitError(f"TensorRT's ONNX parser rejects {onnx_path}: {errors[0] if errors else 'no reason given'}")
    config = builder.create_builder_config()
    timing = config.create_timing_cache(cache or b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    shapes = profiles(io, limits)
    for spec in shapes:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        errors = [line for line in log.lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise LowbitError(f"TensorRT could not build the engine: {errors[0] if errors else 'see the build log'}")
    return {"engine": bytes(engine), "timing_cache": bytes(config.get_timing_cache().serialize()),
            "log": "\n".join(log.lines) + "\n", "seconds": round(time.perf_counter() - t0, 1),
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in shapes],
            "tensorrt": trt.__version__, "plugins": "aot" if aot else "jit"}


def _with_aot(onnx_path: Path, aot: bool):
    """The model as written (plugin nodes say aot = 1), or, for the JIT implementations, its bytes with aot = 0."""
    if aot:
        return onnx_path
    import onnx

    from lowbit.kernels.tensorrt import PLUGIN_DOMAIN

    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        if node.domain == PLUGIN_DOMAIN:
            for a in node.attribute:
                if a.name == "aot":
                    a.i = 0
    return model.SerializeToString()


def engine_files(onnx_path: Path, io: dict, limits: Limits, cache: bytes | None, aot: bool) -> tuple[dict, dict]:
    """Build the engine of an artifact's TensorRT ONNX: ({artifact file: bytes}, the manifest's engine record)."""
    from lowbit.format.artifact import TENSORRT_CACHE_FILE, TENSORRT_ENGINE_FILE, TENSORRT_LOG_FILE

    require_gpu()
    built = build_engine(onnx_path, io, limits, cache, aot)
    files = {TENSORRT_ENGINE_FILE: built["engine"], TENSORRT_LOG_FILE: built["log"].encode(),
             TENSORRT_CACHE_FILE: built["timing_cache"]}
    record = {"file": Path(TENSORRT_ENGINE_FILE).name, "bytes": len(built["engine"]), "seconds": built["seconds"],
              "tensorrt": built["tensorrt"], "plugins": built["plugins"], "gpu": gpu_name(),
              "limits": {"max_batch": limits.max_batch, "max_new_tokens": limits.max_new_tokens,
                         "max_past": limits.max_past}, "profiles": built["profiles"]}
    return files, record


def require_gpu():
    import torch

    if not torch.cuda.is_available():
        raise LowbitError("building a TensorRT engine needs an NVIDIA GPU (the engine is built for the GPU it will run "
                          "on); none is visible here")


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
