"""Multi-task architectures: how a network shares between tasks.

>>> import polytask
>>> polytask.archs.available()  # doctest: +SKIP
>>> model = polytask.archs.create("mmoe", tasks=["income", "marital"], ...)  # doctest: +SKIP
"""

from polytask.archs.base import MultiTaskModel, check_tasks
from polytask.archs.registry import ARCHS, available, create, get, register

# Importing the architecture modules registers them.
from polytask.archs import _catalog  # noqa: F401  isort: skip

__all__ = ["ARCHS", "MultiTaskModel", "available", "check_tasks", "create", "get", "register"]
