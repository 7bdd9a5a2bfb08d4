"""The compile pipeline: load -> trace -> passes -> lower -> artifact, with progress and timings."""

from __future__ import annotations

import time
from pathlib import Path

from lowbit.compiler import artifact
from lowbit.compiler.frontend import hash_model_folder, load_model, read_config, resolve_model_path, trace
from lowbit.compiler.lower_torch import write_torch_target
from lowbit.compiler.progress import say, timed
from lowbit.compiler.recipe import load_recipe
from lowbit.compiler.report import write_report
from lowbit.errors import LowbitError
from lowbit.passes.rtn import rtn_pass

TARGETS = ("torch",)
PASSES = {"rtn": rtn_pass}


def run_passes(graph, recipe, timings: dict, quiet: bool = False):
    if recipe.method in PASSES:
        with timed(timings, f"pass_{recipe.method}", quiet, f"{recipe.method} quantization"):
            PASSES[recipe.method](graph, recipe, show_progress=not quiet)
    return graph


def compile_model(model: str, recipe="rtn-w4g128", target: str = "torch", out=None, force: bool = False,
                  quiet: bool = False) -> Path:
    """Compile ``model`` (a folder or 'demo') with ``recipe`` into an artifact folder ``out``."""
    if target not in TARGETS:
        raise LowbitError(f"unknown target '{target}'; available targets: {', '.join(TARGETS)}")
    if out is None:
        raise LowbitError("no output folder given; pass -o DIR")
    out = Path(out)
    recipe = load_recipe(recipe)
    artifact.check_output_dir(out, force)
    # Validate the model folder before any progress output, so a bad path is one clean error line.
    model_path = resolve_model_path(model)
    read_config(model_path)
    timings: dict = {}
    t0 = time.perf_counter()
    with timed(timings, "load", quiet, f"loading {model}"):
        loaded = load_model(str(model_path))
        source_hash = hash_model_folder(loaded.path)
    with timed(timings, "trace", quiet, "tracing with torch.export"):
        graph = trace(loaded)
    say(f"{len(graph.sites)} quantizable matmuls in {len([b for b in graph.blocks if b])} blocks", quiet)
    run_passes(graph, recipe, timings, quiet)

    def fill(tmp: Path) -> dict:
        with timed(timings, "write", quiet, f"writing artifact {out}"):
            sizes = write_torch_target(tmp, graph, loaded)
        timings["total"] = round(time.perf_counter() - t0, 3)
        body = {"target": target,
                "source": {"path": str(loaded.path.resolve()), "model_type": loaded.model_type,
                           "architectures": list(getattr(loaded.config, "architectures", None) or []),
                           "task": loaded.task, "sha256": source_hash},
                "recipe": recipe.to_dict(), "timings": timings, "sizes": sizes, "metrics": {}}
        write_report(tmp / "report.md", body, graph)
        return body

    return artifact.write_artifact(out, fill, force=force)
