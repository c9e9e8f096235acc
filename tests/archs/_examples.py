"""Tiny instances of every registered architecture for the shared architecture suite.

Each ``examples_*.py`` module in this folder registers, with :func:`example`, a builder per
architecture name returning an :class:`Example`: a small model and an input batch. The suite
fails for a registered architecture that has no example, so a new one cannot go untested.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polytask

EXAMPLES: dict[str, Callable[[], Example]] = {}


@dataclass
class Example:
    model: polytask.archs.MultiTaskModel
    x: Any
    #: names (from ``named_parameters``) that legitimately get no gradient from one
    #: training forward (say why at the example).
    unreached: set[str] = field(default_factory=set)


def example(name: str) -> Callable[[Callable[[], Example]], Callable[[], Example]]:
    def decorator(builder: Callable[[], Example]) -> Callable[[], Example]:
        if name in EXAMPLES:
            raise ValueError(f"two examples for architecture {name!r}")
        EXAMPLES[name] = builder
        return builder

    return decorator


def load_examples() -> dict[str, Callable[[], Example]]:
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name.startswith("examples_"):
            importlib.import_module(f"{package}.{info.name}")
    return EXAMPLES
