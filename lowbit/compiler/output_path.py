"""Where an artifact may be written: checked before any work, so a compile never fails at its very end.

The artifact is built in a temporary folder next to ``out`` and renamed onto it (``format.artifact``), with
``--force`` replacing what was there. So ``out`` must be a folder or not exist yet, its parent must be creatable and
writable, and it must never be a folder whose replacement would destroy far more than an artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from lowbit.errors import LowbitError

# Kernel and device filesystems: writable-looking (root may pass os.access) but no place for files.
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_path(out) -> None:
    """A one-line LowbitError naming ``out`` and the fix when an artifact cannot or must not be written there."""
    given = Path(out)
    where = Path(os.path.abspath(given))            # '..' folded; symlinks kept, as the writer sees the path
    resolved = given.resolve()
    system = next((r for r in SYSTEM_ROOTS if _is_under(where, r) or _is_under(resolved, r)), None)
    if system is not None:
        raise LowbitError(f"output folder '{out}' is under {system}, a system filesystem; choose a -o folder "
                          "elsewhere")
    protected = _protected(resolved)
    if protected:
        raise LowbitError(f"output folder '{out}' is {protected}, which --force would replace; choose a new "
                          "folder, e.g. -o ./artifact")
    if os.path.lexists(given) and not given.is_dir():
        raise LowbitError(f"output path '{out}' exists and is not a folder; remove it or choose another -o")
    _check_parent(out, where.parent)


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _protected(resolved: Path) -> Optional[str]:
    """What ``resolved`` is when it is a folder holding the user's work: the current folder, one of its
    ancestors (the root among them), or the home folder or one of its ancestors."""
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "the current folder"
    if resolved in cwd.parents or resolved == Path(resolved.anchor):
        return "an ancestor of the current folder"
    try:
        home = Path.home().resolve()
    except RuntimeError:                            # no HOME and no passwd entry
        return None
    if resolved == home or resolved in home.parents:
        return "the home folder" if resolved == home else "an ancestor of the home folder"
    return None


def _check_parent(out, parent: Path):
    """The nearest existing ancestor of ``parent`` must be a folder this user may create entries in."""
    existing = parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LowbitError(f"cannot create output folder '{out}': '{existing}' is not a folder; choose another -o")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot create output folder '{out}': '{existing}' is not writable; choose a -o folder "
                          "you can write to")
