"""Helpers of the task-conditioned ("one task at a time") architectures.

TSN, ASTMT and RCM run the whole network once per task, and layers deep inside the user's
backbone behave differently for each task (a per-task adapter, modulator or norm). Rather than
rewriting every block to take a ``task`` argument, the architecture converts the chosen layers
into task-aware ones that read the running task from one :class:`TaskSwitch` they share; the
architecture sets it around each task's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from polytask.errors import PolytaskError

__all__ = ["TaskSwitch", "replace_modules"]


class TaskSwitch:
    """The task a conditioned network is running now, read by its task-aware layers.

    A plain object (not a module), so it adds nothing to ``state_dict``; a ``deepcopy`` of the
    model copies it once and every copied layer shares the copy.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._task: str | None = None

    @contextmanager
    def use(self, task: str) -> Iterator[None]:
        previous, self._task = self._task, task
        try:
            yield
        finally:
            self._task = previous

    def current(self, layer: str) -> str:
        if self._task is None:
            raise PolytaskError(
                f"{layer} is a task-specific layer of {self.owner} and ran outside its forward; "
                f"call the {self.owner} model (forward(x, task=...)) rather than its backbone"
            )
        return self._task


def replace_modules(
    root: nn.Module,
    match: Callable[[str, nn.Module], bool],
    convert: Callable[[str, nn.Module], nn.Module],
) -> tuple[nn.Module, list[str]]:
    """Replace, in place, every submodule of ``root`` for which ``match(name, module)`` holds by
    ``convert(name, module)``; returns the (possibly replaced) root and the replaced names.

    A module object reached under two names is converted once and both places get the same
    replacement, so weight tying survives. The replacements' own children are not visited.
    """
    done: dict[int, nn.Module] = {}
    names: list[str] = []

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        if match(prefix, module):
            new = convert(prefix, module)
            done[id(module)] = done[id(new)] = new
            names.append(prefix)
            return new
        # _modules rather than named_children(), which skips a module's second slot.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = visit(child, f"{prefix}.{child_name}" if prefix else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return visit(root, ""), names
