"""The install contract: pyproject's ranges, the lock the suite runs with (constraints.txt) and the lower bounds
make test-oldest installs (constraints-oldest.txt) agree with each other."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import lowbit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Extras the lock covers: what make setup installs (dev, bench, sign, serve) and what their packages already pull in.
LOCKED_EXTRAS = ("dev", "bench", "runtime", "tensorrt", "plot", "sign", "serve")


def pins(path: Path) -> dict:
    text = path.read_text()
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", text, re.M)
    assert len(found) == len([l for l in text.splitlines() if l.strip() and not l.startswith("#")]), \
        f"{path.name}: every line is a comment or name==version"
    return {canonicalize_name(n): Version(v) for n, v in found}


def requirements(extras=()) -> list:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def lower_bound(req: Requirement):
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(lows) if lows else None


def unlocked(lock: dict, reqs: list) -> list:
    """Requirements the lock does not pin, or pins outside pyproject's range."""
    return [str(r) for r in reqs
            if (v := lock.get(canonicalize_name(r.name))) is None or not r.specifier.contains(v, prereleases=True)]


def test_lock_pins_every_requirement_inside_its_range():
    lock = pins(ROOT / "constraints.txt")
    assert not unlocked(lock, requirements(LOCKED_EXTRAS))
    assert "lowbit" not in lock
    assert all(v.local is None for v in lock.values()), "local labels (+cpu) resolve only where that build is"


def test_lock_check_can_fail():
    """Negative control: a missing pin and a pin outside the range are both reported."""
    reqs = [Requirement("torch>=2.13"), Requirement("onnx>=1.20"), Requirement("numpy")]
    lock = {"torch": Version("2.12.0"), "numpy": Version("2.4.6")}
    assert unlocked(lock, reqs) == ["torch>=2.13", "onnx>=1.20"]


def test_every_dependency_has_a_tested_lower_bound():
    """Each core dependency states its oldest tested version, and constraints-oldest.txt pins exactly that."""
    oldest = pins(ROOT / "constraints-oldest.txt")
    bounds = {canonicalize_name(r.name): lower_bound(r) for r in requirements()}
    assert None not in bounds.values(), [n for n, b in bounds.items() if b is None]
    assert oldest == bounds


def test_version_has_one_source():
    assert PYPROJECT["dynamic"] == ["version"] and "version" not in PYPROJECT
    assert re.fullmatch(r"\d+\.\d+\.\d+", lowbit.__version__)
