"""The benchmarks run from a checkout as the docs say (``python -m bench.NAME`` from the repository root), and no
file that leads ``sys.path`` shadows an installed distribution: ``bench/kernels.py`` once hid the PyPI package
``kernels`` that transformers imports, which broke ``make demo`` while every test passed."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
# What leads sys.path in this project's commands: the working directory (the repository root) for
# `python -m bench.NAME` and `python -m pytest`; tests/ is a package tree, so pytest (prepend import mode) puts
# the repository root there too, never a test folder. bench/ never does: its scripts refuse to run as files.
SEARCH_PATH = (ROOT,)


def importable_names(folder: Path) -> set:
    """Top-level names an import finds in ``folder``: modules and regular packages. A folder without
    ``__init__.py`` is only a namespace portion, which an installed package of the same name wins over."""
    return {p.name.split(".")[0] for p in folder.iterdir()
            if p.suffix in (".py", ".so", ".pyd") or (p.is_dir() and (p / "__init__.py").is_file())}


def shadowed(folder: Path, installed: dict) -> list:
    """The names in ``folder`` that an installed distribution other than lowbit provides."""
    return sorted(n for n in importable_names(folder) if set(installed.get(n, ())) - {"lowbit"})


def _clean_env() -> dict:
    """The environment of a user's shell: no search-path settings inherited from the test run."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONSTARTUP")}


def test_nothing_on_the_search_path_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    assert "torch" in installed and "transformers" in installed       # the mapping is the real one
    bad = {str(folder.relative_to(ROOT)): names for folder in SEARCH_PATH if (names := shadowed(folder, installed))}
    assert not bad, (f"these files shadow installed packages of the same import name: {bad}; rename them "
                     "(or move them into a package)")


def test_every_test_folder_is_a_package():
    """A test folder without ``__init__.py`` would put its parent on sys.path, and its own name then imports as a
    namespace package: tests/lowering/tensorrt made ``import tensorrt`` succeed where TensorRT is not installed."""
    folders = [p for p in (ROOT / "tests").rglob("*") if p.is_dir() and p.name != "__pycache__"] + [ROOT / "tests"]
    assert len(folders) > 5 and [str(p) for p in folders if not (p / "__init__.py").is_file()] == []
    import importlib.util

    for name in {p.name for p in folders} - {"tests"}:          # in this very pytest process
        spec = importlib.util.find_spec(name)
        places = [] if spec is None else [spec.origin or ""] + list(spec.submodule_search_locations or [])
        assert not [p for p in places if ROOT / "tests" in Path(p).parents], (name, places)


def test_shadow_check_can_fail(tmp_path):
    """Negative control: a module, a package and an extension module named like installed ones are found; a
    namespace folder and an unrelated name are not."""
    (tmp_path / "transformers.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "numpy.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "onnx").mkdir()                                        # no __init__.py: a namespace portion
    (tmp_path / "lowbit_only_here.py").write_text("")
    installed = {"transformers": ["transformers"], "kernels": ["kernels"], "numpy": ["numpy"], "onnx": ["onnx"]}
    assert shadowed(tmp_path, installed) == ["kernels", "numpy", "transformers"]


def test_every_bench_script_runs_its_help_from_the_checkout():
    """Each ``python -m bench.NAME --help`` in a fresh process from the repository root, as a user runs it: its
    top-level imports resolve and its arguments parse."""
    assert "demo" in BENCHES and "kernels" in BENCHES
    procs = {name: subprocess.Popen([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, env=_clean_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in BENCHES}
    failed = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        if p.returncode != 0 or "usage:" not in out:
            failed[name] = (p.returncode, err[-1500:])
    assert not failed, failed


def test_bench_script_run_as_a_file_says_how_to_run_it():
    """As a file, bench/ would lead sys.path: the script stops before importing anything, with the command."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "demo.py"), "--help"], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "python -m bench.demo" in out.stderr, (out.returncode, out.stderr)
