"""lowbit: a quantizing compiler and runtime for transformer language models.

    import lowbit
    lowbit.compile("demo", recipe="rtn-w4g64", out="out/smollm2-w4")
    engine = lowbit.load("out/smollm2-w4")
    print(engine.generate("The capital of France is", max_new_tokens=16))
"""

from lowbit.errors import LowbitError
from lowbit.version import __version__


def compile(model: str, recipe="rtn-w4g128", out=None, target: str = "torch", force: bool = False,
            quiet: bool = False, **kw):
    """Compile a model folder (or 'demo') with a recipe (name, .toml path or Recipe) into an artifact folder.

    Keyword options (see ``lowbit.compiler.pipeline.compile_model``): ``calib`` (CalibrationArgs: text,
    samples, seq_len, seed), ``device``, ``resume``, ``eval_text``, ``eval_windows``, ``eval_seq_len``, ``lkd``;
    the target's options as an object (``options=OnnxOptions(accuracy_level=4)``, the classes
    ``lowbit.targets.options_class(target)`` names) or as keywords: ``onnx_accuracy_level``, ``onnx_fusions``,
    ``onnx_exporter`` (--target onnx), ``trt_precision`` (--target tensorrt).
    """
    from lowbit.compiler.pipeline import compile_model

    return compile_model(model, recipe=recipe, target=target, out=out, force=force, quiet=quiet, **kw)


def load(path, backend: str = "auto", **kw):
    """Load an artifact folder; returns a runtime Engine (forward, generate, embed). Where torch is not installed,
    an ONNX artifact loads into the torch-free ``LiteEngine`` (numpy arrays in and out)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from lowbit.runtime.lite import LiteEngine

        if backend not in ("auto", "ort"):
            raise LowbitError(f"backend '{backend}' needs torch, which is not installed; use backend='ort' with an "
                              "artifact compiled with --target onnx") from None
        return LiteEngine.load(path, **kw)
    from lowbit.runtime.engine import Engine

    return Engine.load(path, backend=backend, **kw)


def profile(artifacts, **kw) -> dict:
    """Latency of one or more artifacts (folders or loaded engines): prefill, decode per token and end-to-end
    statistics, tokens/s, peak memory, bandwidth; see ``lowbit.tools.profiler.profile`` for the options and
    docs/formats.md for the document."""
    from lowbit.tools.profiler import profile as run_profile

    return run_profile(artifacts, **kw)


def __getattr__(name):
    if name == "Recipe":
        from lowbit.passes.recipe import Recipe

        return Recipe
    if name in ("Scheme", "GPTQSettings", "LKDSettings", "Override"):
        from lowbit.passes import settings

        return getattr(settings, name)
    raise AttributeError(name)


__all__ = ["compile", "load", "profile", "Recipe", "Scheme", "GPTQSettings", "LKDSettings", "Override", "LowbitError",
           "__version__"]
