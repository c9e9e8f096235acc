"""The backbone registry: named factory functions of plain ``nn.Module`` networks.

Backbones are not multi-task architectures (they have one output); architectures take them as
their encoders, stages or heads. ``create("resnet50", replace_stride_with_dilation=...)`` builds
one by name, so configuration files and the command line can name a backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from polytask.registry import Registry

F = TypeVar("F", bound=Callable[..., nn.Module])

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

__all__ = ["BACKBONES", "available", "create", "register_backbone"]


def register_backbone(name: str) -> Callable[[F], F]:
    """Decorator: register a factory function (or class) under ``name``."""

    def decorator(factory: F) -> F:
        BACKBONES.register(name)(factory)
        return factory

    return decorator


def available(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered backbones (optionally filtered by a glob)."""
    return BACKBONES.available(pattern)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``; unknown names raise a ``ValueError``
    listing close names, unknown arguments the factory's own ``TypeError``."""
    return BACKBONES.get(name)(**kwargs)
