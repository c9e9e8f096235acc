"""Hard parameter sharing: a shared encoder, then task-specific layers and heads."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register

__all__ = ["HardSharing", "as_stage_list", "per_task_heads"]


def as_stage_list(stages: Any, what: str = "encoder") -> list[nn.Module]:
    """A list of stage modules from a list/tuple, ``nn.Sequential`` or ``nn.ModuleList``."""
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        out = list(stages)
    elif isinstance(stages, Sequence) and not isinstance(stages, str):
        out = list(stages)
    else:
        raise TypeError(
            f"{what} must be a list of stage modules (or an nn.Sequential / nn.ModuleList) "
            f"here, got {type(stages).__name__}"
        )
    if not out:
        raise ValueError(f"{what} is an empty list of stages; give at least one module")
    for i, m in enumerate(out):
        if not isinstance(m, nn.Module):
            raise TypeError(f"stage {i} of {what} must be an nn.Module, got {type(m).__name__}")
    if len({id(m) for m in out}) != len(out):
        raise ValueError(f"{what} lists the same module object twice; give distinct stages")
    return out


def per_task_heads(tasks: Sequence[str], heads: Any) -> nn.ModuleDict:
    """One head per task from ``{task: module}``, a list in task order, or one module that is
    deep-copied for every task."""
    if isinstance(heads, nn.Module) and not isinstance(heads, (nn.ModuleList, nn.ModuleDict)):
        return nn.ModuleDict({t: copy.deepcopy(heads) for t in tasks})
    if isinstance(heads, (Mapping, nn.ModuleDict)):
        keys = list(heads.keys())
        if set(keys) != set(tasks):
            raise ValueError(
                f"heads has keys {sorted(map(str, keys))} but the tasks are {list(tasks)}; give "
                "exactly one head per task"
            )
        out = {t: heads[t] for t in tasks}
    elif isinstance(heads, (Sequence, nn.ModuleList)) and not isinstance(heads, str):
        items = list(heads)
        if len(items) != len(tasks):
            raise ValueError(
                f"heads lists {len(items)} modules for {len(tasks)} tasks {list(tasks)}; give "
                "one per task, in task order"
            )
        out = dict(zip(tasks, items))
    else:
        raise TypeError(
            "heads must be a dict {task: module}, a list of modules in task order, or one "
            f"module to copy per task; got {type(heads).__name__}"
        )
    for t, m in out.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"the head of task {t!r} must be an nn.Module, got {type(m).__name__}")
    if len({id(m) for m in out.values()}) != len(out):
        raise ValueError(
            "two tasks were given the same head module object; give each task its own head "
            "(or pass one module, which is copied per task)"
        )
    return nn.ModuleDict(out)


def check_disjoint(shared: nn.Module, owned: Mapping[str, nn.Module], owner: str) -> None:
    """Raise if a parameter of the shared part also sits in a task's modules, or in two."""
    seen = {id(p): "the shared encoder" for p in shared.parameters()}
    for t, module in owned.items():
        for p in module.parameters():
            if id(p) in seen and seen[id(p)] != f"task {t!r}":
                raise ValueError(
                    f"{owner}: a parameter of shape {tuple(p.shape)} is in both {seen[id(p)]} "
                    f"and task {t!r}'s modules; a module may appear in one place only"
                )
            seen[id(p)] = f"task {t!r}"


@register("hard_sharing")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing: ``y_t = head_t(tower_t(encoder(x)))``.

    The oldest and most common MTL network (Caruana, "Multitask Learning", Machine Learning
    28, 1997; overview: Ruder, "An Overview of Multi-Task Learning in Deep Neural Networks",
    arXiv:1706.05098, 2017): every task reads one shared encoder, then its own layers. The
    encoder is the user's: one module, shared whole, or a list of stages with a ``split``
    point: stages ``[0, split)`` are shared and stages ``[split, n)`` are deep-copied for each
    task (``towers[t]``; each copy starts from the given weights, e.g. a pretrained
    backbone's, and the given modules after the split are not used themselves). ``split=0``
    gives K independent networks (nothing shared); ``split=n`` shares every stage.

    Args:
        tasks: task names or their number K.
        encoder: the shared module, or a list of stage modules (a list, ``nn.Sequential`` or
            ``nn.ModuleList``) when ``split`` is given.
        heads: ``{task: module}``, a list in task order, or one module copied per task.
        split: number of leading stages to share (default: the whole encoder is shared).

    Partition: the encoder's shared stages are shared; a task's stage copies and its head are
    its own. :meth:`encode` returns the output of the shared stages (the input itself when
    ``split=0``), :meth:`decode` the heads' outputs from it.
    """

    paper = (
        "Caruana, Multitask Learning, Machine Learning 28(1), 1997; Ruder, An Overview of "
        "Multi-Task Learning in Deep Neural Networks, arXiv:1706.05098, 2017"
    )
    has_shared_representation = True

    def __init__(
        self,
        tasks: Sequence[str] | int,
        encoder: nn.Module | Sequence[nn.Module],
        heads: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
        split: int | None = None,
    ) -> None:
        super().__init__(tasks)
        if split is None:
            if not isinstance(encoder, nn.Module) or isinstance(encoder, nn.ModuleList):
                raise TypeError(
                    f"encoder must be an nn.Module when split is None, got "
                    f"{type(encoder).__name__}; to share part of a list of stages give split="
                )
            self.encoder: nn.Module = encoder
            towers: dict[str, nn.Module] = {t: nn.Identity() for t in self.tasks}
            self.split = None
        else:
            stages = as_stage_list(encoder)
            if isinstance(split, bool) or not isinstance(split, int):
                raise TypeError(f"split must be an int, got {split!r}")
            if not 0 <= split <= len(stages):
                raise ValueError(
                    f"split={split} must be between 0 (no stage shared) and {len(stages)} (all "
                    "stages shared), the number of stages"
                )
            self.encoder = nn.Sequential(*stages[:split])
            rest = stages[split:]
            towers = {t: nn.Sequential(*copy.deepcopy(rest)) for t in self.tasks}
            self.split = split
        self.towers = nn.ModuleDict(towers)
        self.heads = per_task_heads(self.tasks, heads)
        check_disjoint(self.encoder, {t: self.heads[t] for t in self.tasks}, type(self).__name__)

    def encode(self, x: Any) -> Tensor:
        return self.encoder(x)

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            t = self.check_task(task)
            return self.heads[t](self.towers[t](features))
        return {t: self.heads[t](self.towers[t](features)) for t in self.tasks}

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        return self.decode(self.encode(x), task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        t = self.check_task(task)
        yield from self.towers[t].parameters()
        yield from self.heads[t].parameters()
