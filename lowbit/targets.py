"""The one registry of targets: what ``lowbit compile --target`` can emit and which runtime backends run it.

Each target names its compiler lowering and the runtime backends that run its artifacts by import path
("module:attribute"), resolved on use, so this module imports neither ``compiler`` nor ``runtime`` and each
side loads only its own half. A lowering (``compiler/lower_*.py``) provides ``fuse`` (whether the fusion rules
rewrite the graph first), ``prepare(recipe, options) -> recipe`` (before any work), ``check(graph, recipe)``
(after tracing, before the passes), optionally ``check_model(loaded)`` (then too: what it needs of the model's
config and tokenizer) and ``write(tmp, graph, loaded, recipe, options, timings, quiet) -> dict``
(the manifest entries it adds), with ``options`` the target's options object (its class named here, fields
declared with ``lowbit.options.option``: the CLI derives the flags, ``lowbit.compile`` the keywords). A backend
(``runtime/*``) provides ``open(path, manifest, options) -> runner``. Adding a target is one entry here, one
lowering module and, when it takes options, one options class.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.registry import Registry


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    lowering: str                  # "module:attribute" of the compiler's lowering
    backends: tuple[str, ...]      # runtime backends that run its artifacts, the default ("auto") first
    options: str | None = None     # "module:class" of its options (lowbit.options fields; torch-free module)


TARGETS = {t.name: t for t in (
    Target("torch", "the shipped graph for lowbit's torch runtime", "lowbit.lowering.program:LOWERING",
           ("torch",)),
    Target("onnx", "the torch target plus onnx/model.onnx for ONNX Runtime", "lowbit.lowering.onnx.lower:LOWERING",
           ("ort", "torch"), "lowbit.lowering.onnx.options:OnnxOptions"),
    Target("tensorrt", "the torch target plus tensorrt/model.onnx (TensorRT's dialect, lowbit plugins) for TensorRT",
           "lowbit.lowering.tensorrt.lower:LOWERING", ("tensorrt", "ort", "torch"),
           "lowbit.lowering.tensorrt.options:TensorRTOptions"),
    Target("hf-gptq", "a transformers GPTQ checkpoint folder, symmetric 4/8-bit (vLLM, transformers, GPTQModel)",
           "lowbit.lowering.hf_gptq:LOWERING", ()),
    Target("hf-awq", "a transformers AWQ checkpoint folder, 4-bit with zero points (vLLM, transformers, GPTQModel)",
           "lowbit.lowering.hf_awq:LOWERING", ()),
    Target("compressed-tensors", "a compressed-tensors checkpoint folder: 2-8 bit weights, W8A8 (vLLM, transformers)",
           "lowbit.lowering.compressed_tensors:LOWERING", ()),
    Target("gguf", "model.gguf for llama.cpp: Q4_0 / Q8_0 blocks from the recipe's own codes (gptq-q4_0)",
           "lowbit.lowering.gguf_model:LOWERING", ()),
)}
LOWERINGS = Registry("target", {t.name: t.lowering for t in TARGETS.values()})
OPTIONS = Registry("target options", {t.name: t.options for t in TARGETS.values() if t.options})
BACKENDS = Registry("backend", {"torch": "lowbit.runtime.torch_runner:TorchRunner",
                                "ort": "lowbit.runtime.ort_backend:OrtRunner",
                                "tensorrt": "lowbit.runtime.tensorrt_runner:TensorRTRunner"})


def target(name: str) -> Target:
    if name not in TARGETS:
        raise LowbitError(f"unknown target '{name}'; available targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def lowering(name: str):
    """The compiler's lowering for target ``name``."""
    return LOWERINGS.get(target(name).name)


def options_class(name: str):
    """The options class of target ``name``, or None when it takes none."""
    return OPTIONS.get(name) if target(name).options else None


def target_options(name: str, given=None, **keywords):
    """The options object of target ``name``: ``given`` (an instance of its class), or one built from
    ``lowbit.compile`` keywords; a keyword of another target's options is refused, naming that target."""
    from lowbit import options as typed

    cls = options_class(name)
    if given is not None:
        if cls is None or not isinstance(given, cls):
            raise LowbitError(f"target '{name}' takes {cls.__name__ if cls else 'no options'}, not "
                              f"{type(given).__name__}")
        if keywords:
            raise LowbitError("give target options either as an options object or as keywords, not both")
        return given
    try:
        return typed.from_keywords(cls, keywords) if cls else typed.from_keywords(_NoOptions, keywords)
    except KeyError as e:
        keyword = e.args[0]
        owner = next((t for t in TARGETS.values() if t.options and keyword in typed.keywords(options_class(t.name))),
                     None)
        if owner is None:
            raise TypeError(f"compile() got an unexpected keyword argument '{keyword}'") from None
        raise LowbitError(f"{typed.flag(options_class(owner.name), keyword)} ({keyword}) applies to --target "
                          f"{owner.name}, not {name}") from None


@dataclass(frozen=True)
class _NoOptions:
    """The options of a target that takes none."""


def backend_for(target_name: str, requested: str, where: str) -> str:
    """The backend to run an artifact of ``target_name`` with: ``requested``, or the target's default for 'auto'."""
    if requested != "auto" and requested not in BACKENDS:
        raise LowbitError(f"unknown backend '{requested}'; available: auto, {', '.join(BACKENDS)}")
    runnable = TARGETS[target_name].backends if target_name in TARGETS else ()
    if not runnable:
        able = [t for t, spec in TARGETS.items() if spec.backends]
        raise LowbitError(f"{where} was compiled for target '{target_name}', which lowbit's runtime cannot run; "
                          f"recompile with --target {' or --target '.join(able)}")
    if requested == "auto":
        return runnable[0]
    if requested not in runnable:
        needs = [t for t, spec in TARGETS.items() if requested in spec.backends]
        raise LowbitError(f"{where} was compiled for target '{target_name}', which backend '{requested}' cannot run; "
                          f"recompile it with --target {' or --target '.join(needs)} to use --backend {requested}")
    return requested


def backend(name: str):
    """The runtime's runner class for backend ``name``."""
    return BACKENDS.get(name)
