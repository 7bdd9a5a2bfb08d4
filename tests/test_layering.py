"""Imports point one way (docs/architecture.md): the runtime never imports the compiler side, the compiler side
never the runtime, and the neutral packages (formats, plugins, the target registry) neither."""

import ast
from pathlib import Path

import pytest

import lowbit

ROOT = Path(lowbit.__file__).parent
COMPILER_SIDE = ("lowbit.compiler", "lowbit.passes", "lowbit.rules")
RUNTIME_SIDE = ("lowbit.runtime",)
FORBIDDEN = {
    "runtime": COMPILER_SIDE + ("lowbit.eval", "lowbit.demo.assets", "lowbit.demo"),
    "compiler": RUNTIME_SIDE,
    "passes": RUNTIME_SIDE,
    "rules": RUNTIME_SIDE,
    "format": COMPILER_SIDE + RUNTIME_SIDE,
    "plugins": COMPILER_SIDE + RUNTIME_SIDE,
    "targets.py": COMPILER_SIDE + RUNTIME_SIDE,
    "host.py": COMPILER_SIDE + RUNTIME_SIDE + ("torch",),
}


def imported_modules(source: str) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def violations(source: str, forbidden: tuple) -> list[str]:
    return sorted(m for m in imported_modules(source) if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_one_way(part):
    files = [ROOT / part] if part.endswith(".py") else sorted((ROOT / part).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): v for f in files if (v := violations(f.read_text(), FORBIDDEN[part]))}
    assert not bad, bad


def test_checker_catches_a_backward_import():
    """Negative control: a function-level import of the compiler in runtime code is found."""
    src = "def f():\n    from lowbit.compiler.frontend import load_model\n    return load_model\n"
    assert violations(src, FORBIDDEN["runtime"]) == ["lowbit.compiler.frontend", "lowbit.compiler.frontend.load_model"]
    assert violations("from lowbit import targets\n", FORBIDDEN["runtime"]) == []
