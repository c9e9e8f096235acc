"""Imports every architecture module of this package so that each registers itself.

A new architecture is one new module here with a ``@register("name")`` class; the shared
architecture suite (tests/archs) tests it the moment it exists.
"""

from __future__ import annotations

import importlib
import pkgutil

_INFRASTRUCTURE = {"base", "registry"}


def _import_all() -> None:
    package = __name__.rsplit(".", 1)[0]
    path = importlib.import_module(package).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _INFRASTRUCTURE:
            continue
        importlib.import_module(f"{package}.{info.name}")


_import_all()
