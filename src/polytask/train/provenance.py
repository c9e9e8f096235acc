"""What a stored run records about the code that made it: versions and the git commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import polytask

__all__ = ["checkout_commit", "provenance"]


def checkout_commit(root: Path, code: Path | None = None) -> str | None:
    """HEAD of the git checkout at ``root``, with ``-dirty`` appended when tracked files
    under ``code`` (default: the whole checkout) differ from it; ``None`` when ``root`` is not
    a git checkout or git is missing."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = git("diff", "--quiet", "HEAD", "--", str(code or root)).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _package() -> Path:
    return Path(polytask.__file__).resolve().parent


def _source_checkout() -> Path | None:
    # Only a source layout (CHECKOUT/src/polytask) names a checkout: an installed copy lives
    # in site-packages, whose enclosing repository (a venv inside some project) is not ours.
    package = _package()
    return package.parents[1] if package.parent.name == "src" else None


def _commit_at_import() -> str | None:
    # Dirty means the package's code was edited; edits to docs or configs are not the code
    # (a run records its recipe and hyper-parameters itself).
    root = _source_checkout()
    return None if root is None else checkout_commit(root, _package())


#: Read once, when this process imports polytask's runner: a sweep whose checkout moves on
#: (a commit, an edit) while it runs still records the code it imported.
CODE_COMMIT = _commit_at_import()


def provenance() -> dict[str, Any]:
    """The versions and commit recorded with each run this process starts."""
    return {
        "polytask_version": polytask.__version__,
        "torch_version": torch.__version__,
        "git_commit": CODE_COMMIT,
        "python": platform.python_version(),
    }
