"""Frozen single-task teachers and per-task argument checks shared by the distillation losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError

__all__ = ["FrozenTeachers", "per_task"]


class FrozenTeachers(nn.Module):
    """K single-task teachers, frozen (no parameter requires grad) and always in eval mode.

    Args:
        teachers: one module per task, as a sequence or as a mapping from task names (whose
            order then fixes the task order).
    """

    def __init__(self, teachers: Sequence[nn.Module] | Mapping[str, nn.Module]) -> None:
        super().__init__()
        if isinstance(teachers, Mapping):
            names = [str(n) for n in teachers]
            modules = list(teachers.values())
        elif isinstance(teachers, Sequence) and not isinstance(teachers, (str, bytes)):
            modules = list(teachers)
            names = [str(i) for i in range(len(modules))]
        else:
            raise InvalidHyperparameterError(
                f"teachers must be a sequence or a mapping of nn.Modules (one per task), got "
                f"{type(teachers).__name__}"
            )
        if not modules:
            raise InvalidHyperparameterError("teachers is empty; give one teacher per task")
        for name, m in zip(names, modules):
            if not isinstance(m, nn.Module):
                raise InvalidHyperparameterError(
                    f"teacher {name!r} is a {type(m).__name__}, not an nn.Module"
                )
        self.names = names
        self.named = isinstance(teachers, Mapping)
        self.modules_ = nn.ModuleList(modules)
        self.modules_.requires_grad_(False)
        self.modules_.eval()

    def __len__(self) -> int:
        return len(self.modules_)

    def train(self, mode: bool = True) -> FrozenTeachers:
        # The student's model.train() must not switch the teachers' dropout and BatchNorm on.
        super().train(mode)
        self.modules_.eval()
        return self

    def forward(self, inputs: Any = None, task_inputs: Any = None) -> list[Tensor]:
        """Each teacher's output on ``inputs`` (one input for all) or ``task_inputs[k]``."""
        if (inputs is None) == (task_inputs is None):
            raise TypeError(
                "pass exactly one of inputs=<the batch every teacher reads> and "
                "task_inputs=<one batch per task>"
            )
        per = None if task_inputs is None else per_task(task_inputs, self, "task_inputs")
        with torch.no_grad():
            return [t(inputs if per is None else per[k]) for k, t in enumerate(self.modules_)]


def per_task(values: Any, teachers: FrozenTeachers, what: str) -> list[Any]:
    """``values`` as a list in task order: a sequence of K entries, or a mapping with the
    teachers' task names as keys."""
    k = len(teachers)
    if isinstance(values, Mapping):
        keys = [str(n) for n in values]
        if sorted(keys) != sorted(teachers.names):
            raise ValueError(f"{what} has keys {keys} but the teachers' tasks are {teachers.names}")
        lookup = {str(n): v for n, v in values.items()}
        return [lookup[n] for n in teachers.names]
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        if len(values) != k:
            raise ValueError(f"{what} has {len(values)} entries but there are {k} tasks")
        return list(values)
    raise TypeError(
        f"{what} must be a sequence of {k} entries (one per task) or a mapping by task name, "
        f"got {type(values).__name__}"
    )
