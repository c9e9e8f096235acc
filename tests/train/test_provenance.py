"""The commit a stored run records: the checkout's HEAD (``-dirty`` with edits to tracked
files), read once when the process imports the runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import polytask
from polytask.train import provenance as prov

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_checkout_commit_is_head_and_marks_edits(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert prov.checkout_commit(tmp_path) == head
    (tmp_path / "new.py").write_text("untracked\n")  # not part of the code git knows
    assert prov.checkout_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert prov.checkout_commit(tmp_path) == head + "-dirty"
    # Only edits under the code count when the code is named.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("y = 1\n")
    _git(tmp_path, "add", "pkg/m.py")
    _git(tmp_path, "commit", "-q", "-m", "two")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert prov.checkout_commit(tmp_path, tmp_path / "pkg") == head
    (tmp_path / "pkg" / "m.py").write_text("y = 2\n")
    assert prov.checkout_commit(tmp_path, tmp_path / "pkg") == head + "-dirty"


def test_checkout_commit_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert prov.checkout_commit(tmp_path) is None


def test_only_a_source_layout_names_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polytask, "__file__", "/repo/src/polytask/__init__.py")
    assert prov._source_checkout() == Path("/repo").resolve()
    installed = "/repo/.venv/lib/python3.11/site-packages/polytask/__init__.py"
    monkeypatch.setattr(polytask, "__file__", installed)
    assert prov._source_checkout() is None


def test_provenance_keeps_the_commit_read_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(prov, "checkout_commit", lambda root: calls.append(root) or "moved")
    record = prov.provenance()
    assert calls == [] and record["git_commit"] == prov.CODE_COMMIT
    assert record["polytask_version"] == polytask.__version__
