"""compiler.output_path.check_output_path: every -o a compile could only fail on (or must never replace) is
refused up front, in one line naming the path and the fix; ordinary new or existing artifact folders pass."""

import os
from pathlib import Path

import pytest

from lowbit.compiler.output_path import check_output_path
from lowbit.errors import LowbitError


def refused(path) -> str:
    with pytest.raises(LowbitError) as e:
        check_output_path(path)
    msg = str(e.value)
    assert "\n" not in msg and f"'{path}'" in msg and "-o" in msg, msg
    return msg


def test_new_and_existing_folders_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_output_path(tmp_path / "art")
    check_output_path(tmp_path / "not" / "yet" / "art")          # parents are created by the writer
    check_output_path("relative-art")
    (tmp_path / "old").mkdir()
    check_output_path(tmp_path / "old")                          # --force decides about replacing it
    check_output_path(Path("..") / tmp_path.name / "art")


def test_existing_non_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "exists and is not a folder" in refused(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert "exists and is not a folder" in refused(tmp_path / "dangling")
    assert "'" + str(tmp_path / "file") + "' is not a folder" in refused(tmp_path / "file" / "art")


@pytest.mark.parametrize("path", ["/proc/x", "/sys/lowbit", "/dev/art", "/proc"])
def test_system_filesystems_are_refused(path):
    assert "system filesystem" in refused(path)


def test_folders_whose_replacement_would_be_disastrous(tmp_path, monkeypatch):
    work = tmp_path / "home" / "me" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    monkeypatch.chdir(work)
    assert "the current folder" in refused(".")
    assert "the current folder" in refused("")
    assert "the current folder" in refused(work)
    assert "the current folder" in refused("sub/..")
    assert "an ancestor of the current folder" in refused("..")
    assert "an ancestor of the current folder" in refused(tmp_path)
    assert "an ancestor of the current folder" in refused("/")
    monkeypatch.chdir(tmp_path / "home" / "me" / "..")
    assert "the home folder" in refused(tmp_path / "home" / "me")
    monkeypatch.chdir(work)
    link = tmp_path / "link-to-work"
    link.symlink_to(work)
    assert "the current folder" in refused(link)                 # through a symlink too


def test_unwritable_parent_is_refused(tmp_path, monkeypatch):
    """os.access is what the check asks; faked here so the test also holds when run as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    assert "'" + str(locked) + "' is not writable" in refused(locked / "a" / "art")
    check_output_path(tmp_path / "art")                           # negative control: a writable parent passes
