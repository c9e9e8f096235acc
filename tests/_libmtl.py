"""LibMTL 1.1.5 without its package ``__init__`` (which imports torchvision, absent here).

Every test that compares against LibMTL registers the bare ``LibMTL`` package through these
helpers, so the registration is done once, the same way, and carries a proper ``__spec__``
(``importlib.util.find_spec`` raises on a module in ``sys.modules`` whose spec is ``None``).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest


def libmtl_root() -> Path:
    """The installed ``LibMTL`` folder; skips the test when LibMTL is not installed."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "LibMTL"
        if (candidate / "weighting").is_dir():
            return candidate
    pytest.skip("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")


def bare_package(name: str, path: Path | None) -> types.ModuleType:
    """A package module whose submodules are found in ``path`` (none when ``None``)."""
    module = types.ModuleType(name)
    locations = [str(path)] if path is not None else []
    module.__path__ = locations  # type: ignore[attr-defined]
    module.__package__ = name
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = locations
    return module


def register_libmtl() -> Path:
    """Register the bare ``LibMTL`` package (once) and return its folder."""
    root = libmtl_root()
    if "LibMTL" not in sys.modules:
        sys.modules["LibMTL"] = bare_package("LibMTL", root)
    return root
