"""The architecture registry: ``register``, ``available``, ``get``, ``create``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from polytask.archs.base import MultiTaskModel
from polytask.errors import UnknownArchitectureError, UnknownHyperparameterError
from polytask.registry import Registry

A = TypeVar("A", bound=type[MultiTaskModel])

ARCHS: Registry[type[MultiTaskModel]] = Registry("architecture", UnknownArchitectureError)

__all__ = ["ARCHS", "available", "create", "get", "register"]


def register(name: str) -> Callable[[A], A]:
    """Class decorator: register a :class:`MultiTaskModel` subclass under ``name``."""

    def decorator(cls: A) -> A:
        if not cls.paper:
            raise ValueError(f"{cls.__name__} must cite its paper in `paper`")
        cls.name = name
        ARCHS.register(name)(cls)
        return cls

    return decorator


def available(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered architectures (optionally filtered by a glob)."""
    return ARCHS.available(pattern)


def get(name: str) -> type[MultiTaskModel]:
    """The architecture class registered under ``name``."""
    return ARCHS.get(name)


def create(name: str, **kwargs: Any) -> MultiTaskModel:
    """Build the architecture registered as ``name`` from its keyword arguments.

    Unknown names raise :class:`~polytask.errors.UnknownArchitectureError` (a ``ValueError``)
    listing close names; unknown arguments raise
    :class:`~polytask.errors.UnknownHyperparameterError` (a ``TypeError``) naming them.
    """
    cls = ARCHS.get(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n in params if n != "self"]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, accepted, n=3, cutoff=0.5)
                hints.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise UnknownHyperparameterError(
                f"{cls.__name__} got unknown argument(s) {', '.join(hints)}; it accepts "
                f"{', '.join(accepted)}"
            )
    return cls(**kwargs)
