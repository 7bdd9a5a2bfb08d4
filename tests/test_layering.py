"""The package's layers and the one direction of their imports (docs/architecture.md, "Layout"): every import
statement in lowbit, at module or function level, names only its own layer or one the layer declares below it,
and the declared layers form no cycle."""

import ast
from pathlib import Path

import pytest

import lowbit

ROOT = Path(lowbit.__file__).parent

# layer: the layers it may import (besides itself). A layer is a module or package path under lowbit; a module
# belongs to the longest layer path that prefixes it.
LAYERS = {
    "base": set(),                      # errors, version, progress, host, device, targets (by name), options, distributed
    "demo": {"base"},                   # demo assets: the model, encoder and texts behind the word 'demo'
    "format": {"base"},                 # the contract: quantization math, program, op table, artifact, signing
    "metrics": {"base", "demo"},        # text windows and perplexity
    "kernels": {"base"},                # the folder's __init__ (a docstring)
    "kernels.triton": {"base"},
    "kernels.cpu": {"base", "format"},
    "ops": {"base", "format", "kernels.triton"},       # the lowbit:: op contract and reference kernels
    "kernels.tensorrt": {"base", "format", "ops", "kernels.triton"},
    "ir": {"base", "format", "ops"},
    "frontend": {"base", "demo", "format", "ops", "ir"},
    "passes": {"base", "format", "ops", "ir", "frontend"},
    "rules": {"base", "format", "ops", "ir"},
    "lowering": {"base", "format", "ops", "ir", "frontend", "passes", "kernels.tensorrt"},
    "compiler": {"base", "demo", "metrics", "format", "ops", "ir", "frontend", "passes", "rules", "lowering"},
    "runtime": {"base", "format", "ops", "kernels.cpu", "kernels.tensorrt"},
    "tools": {"base", "demo", "metrics", "format", "ops", "kernels.cpu", "kernels.tensorrt", "frontend", "runtime"},
    "cli": {"base", "demo", "format", "kernels.tensorrt", "passes", "lowering", "compiler", "runtime", "tools"},
    "api": {"base", "compiler", "passes", "runtime", "tools"},       # lowbit/__init__.py: compile, load, profile
    "__main__": {"cli"},                                              # python -m lowbit (what torchrun starts)
}
BASE_MODULES = ("errors", "version", "progress", "host", "device", "targets", "options", "registry", "distributed")


def layer_of(module: str):
    """The layer of a dotted module name under lowbit, or None for anything outside lowbit."""
    if module == "lowbit":
        return "api"
    if not module.startswith("lowbit."):
        return None
    rest = module[len("lowbit."):]
    if rest.split(".")[0] in BASE_MODULES:
        return "base"
    for layer in sorted(LAYERS, key=len, reverse=True):
        if rest == layer or rest.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no declared layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, known: set) -> set:
    """Every lowbit module an import statement names, at any depth: ``from lowbit import x`` is module
    ``lowbit.x`` when that exists, and importing the package root ``lowbit`` itself (its module-level code imports
    only base modules) counts as base."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.startswith("lowbit.") or n == "lowbit")
    return {"lowbit.errors" if n == "lowbit" else n for n in out}


def allowed(layer: str) -> set:
    seen, todo = set(), [layer]
    while todo:
        for dep in LAYERS[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen | {layer}


def backward_imports(files: dict) -> dict:
    """{module: [imports it may not make]} for {module: source}."""
    known = set(files)
    bad = {}
    for module, source in files.items():
        layer = layer_of(module)
        wrong = sorted(m for m in imported(source, known) if layer_of(m) not in allowed(layer))
        if wrong:
            bad[module] = wrong
    return bad


def package_sources() -> dict:
    return {module_name(p): p.read_text() for p in sorted(ROOT.rglob("*.py"))}


def test_declared_layers_form_no_cycle():
    for layer in LAYERS:
        assert all(layer not in allowed(dep) for dep in LAYERS[layer]), f"{layer} is on a cycle"


def test_every_module_has_a_layer():
    for module in package_sources():
        layer_of(module)


def test_imports_point_one_way():
    assert not backward_imports(package_sources())


@pytest.mark.parametrize("module,source,wrong", [
    ("lowbit.runtime.engine", "def f():\n    from lowbit.frontend.load import load_model\n",
     ["lowbit.frontend.load"]),
    ("lowbit.format.program", "import lowbit.ops\n", ["lowbit.ops"]),
    ("lowbit.passes.rtn", "from lowbit.lowering import program\n", ["lowbit.lowering.program"]),
    ("lowbit.ir.graph", "from lowbit.tools.eval import scorer\n", ["lowbit.tools.eval"]),
])
def test_checker_catches_a_backward_import(module, source, wrong):
    """Negative control: function-level and module-level imports up the layers are found; imports down are not."""
    files = {module: source, "lowbit.frontend.load": "", "lowbit.ops": "", "lowbit.lowering.program": "",
             "lowbit.tools.eval": ""}
    assert backward_imports(files) == {module: wrong}
    assert backward_imports({module: "from lowbit.errors import LowbitError\nimport lowbit\n"}) == {}


def test_host_needs_no_torch():
    """lowbit doctor describes the CPU where torch is broken or missing."""
    assert "torch" not in {n.split(".")[0] for n in _all_imports((ROOT / "host.py").read_text())}


def _all_imports(source: str) -> set:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def stray_test_folders(tests: Path, package: Path) -> list:
    """Folders under ``tests`` with no folder of the same path in ``package``."""
    folders = [p.relative_to(tests) for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    return [str(f) for f in folders if not (package / f).is_dir()]


def test_tests_mirror_the_layout(tmp_path):
    """Each folder under tests/ is a package or folder of lowbit (tests/lowering/onnx -> lowbit/lowering/onnx), so a
    stage's tests are one folder hop from its code; tests of several stages (CLI, layering, packaging) stay at the
    top."""
    tests = Path(__file__).parent
    assert (tests / "lowering" / "onnx").is_dir() and stray_test_folders(tests, ROOT) == []
    (tmp_path / "passes").mkdir()
    (tmp_path / "compilers").mkdir()                       # negative control: a folder lowbit does not have
    assert stray_test_folders(tmp_path, ROOT) == ["compilers"]
