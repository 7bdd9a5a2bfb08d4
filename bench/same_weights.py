"""Whether a change left the compiled weights alone: compiles the demo LM with each recipe (and target) at a base
commit and at this checkout, and compares every file the two artifacts hold, byte for byte, except: ``manifest.json``
and ``graph.json`` are compared as JSON without their timing entries and the manifest without its hashes, tool
versions, source path, recipe entry (which restate the other files and the code) and ``streamed`` (how the compile
ran, not what it wrote); ``program.json`` as JSON with its call nodes named by position on both sides
(``format.program.canonical_names``, so a base that named them in rewrite order compares); ``report.md`` is skipped.

    python -m bench.same_weights [--base HEAD~1] [--recipes rtn-w4g64 zq-w8a8 gptq-w4g64 rtn-w4g64-sym:onnx ...]

The base commit is checked out with ``git worktree`` into a temporary folder and run with this checkout's Python
environment (its lowbit first on the path). Exit 1 if any file differs.
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.same_weights")

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["rtn-w4g64", "zq-w8a8", "gptq-w4g64", "rtn-w4g64-sym:onnx", "rtn-w4g64-sym:hf-gptq"]
VOLATILE = {"seconds", "timings", "files", "tools", "recipe", "source", "export_seconds", "streamed"}


def compile_at(src: Path, spec: str, out: Path) -> None:
    recipe, _, target = spec.partition(":")
    cmd = [sys.executable, "-m", "lowbit.cli", "compile", "demo", "-r", recipe, "-t", target or "torch", "-o", str(out),
           "-q", "--calib-samples", "8", "--calib-seq-len", "128"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{spec} at {src}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def _stable(doc):
    if isinstance(doc, dict):
        return {k: _stable(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_stable(v) for v in doc]
    return doc


def _named(doc: dict) -> dict:
    from lowbit.format.program import canonical_names

    return {**doc, "nodes": canonical_names(doc["nodes"])}


def _differing_keys(x, y, path: str = "") -> list[str]:
    """The dotted paths where two JSON documents differ."""
    if isinstance(x, dict) and isinstance(y, dict):
        return [k for key in sorted(set(x) | set(y))
                for k in _differing_keys(x.get(key), y.get(key), f"{path}.{key}" if path else key)]
    return [] if x == y else [path or "(root)"]


def differing(a: Path, b: Path) -> tuple[list[str], int]:
    """(files that differ or exist on one side only, files compared)."""
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    names = [n for n in names if n.name != "report.md"]
    bad = []
    for n in names:
        x, y = a / n, b / n
        if not (x.is_file() and y.is_file()):
            bad.append(f"{n} (one side only)")
        elif n.name in ("manifest.json", "graph.json"):
            keys = _differing_keys(_stable(json.loads(x.read_text())), _stable(json.loads(y.read_text())))
            if keys:
                bad.append(f"{n} ({', '.join(keys[:4])})")
        elif n.name == "program.json":
            if _named(json.loads(x.read_text())) != _named(json.loads(y.read_text())):
                bad.append(str(n))
        elif x.read_bytes() != y.read_bytes():
            bad.append(str(n))
    return bad, len(names)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    p.add_argument("--recipes", nargs="+", default=DEFAULT, help="RECIPE or RECIPE:TARGET, compiled from the demo LM")
    a = p.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", a.base], cwd=ROOT, capture_output=True, text=True)
    if rev.returncode:
        raise SystemExit(f"--base {a.base}: not a commit of this repository")
    with tempfile.TemporaryDirectory(prefix="same-weights-") as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tmp / "base"), a.base], cwd=ROOT, check=True)
        try:
            print(f"| artifact | files compared | differ (base {rev.stdout.strip()} vs this checkout) |\n|---|---|---|")
            failed = False
            for spec in a.recipes:
                name = spec.replace(":", "-")
                compile_at(tmp / "base", spec, tmp / "a" / name)
                compile_at(ROOT, spec, tmp / "b" / name)
                bad, n = differing(tmp / "a" / name, tmp / "b" / name)
                failed |= bool(bad)
                print(f"| {spec} | {n} | {', '.join(bad) or 'none'} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "base")], cwd=ROOT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
