"""The base class of every multi-task architecture.

An architecture maps an input to one output per task: ``forward(x)`` returns a dict
``{task: output}``, ``forward(x, task=t)`` only task t's output (computing only what t needs
where the architecture allows it). Its parameters split exactly into the ones every task
shares (:meth:`MultiTaskModel.shared_parameters`, what a balancing method balances) and each
task's own (:meth:`MultiTaskModel.task_parameters`). Architectures with one shared
representation that task-specific modules read (hard sharing, experts, ...) also expose
:meth:`encode` and :meth:`decode`, so that ``mode="features"`` of the balancing methods works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from polytask.errors import PolytaskError

__all__ = ["MultiTaskModel", "check_tasks"]


def check_tasks(tasks: Sequence[str] | int) -> tuple[str, ...]:
    """Normalise ``tasks``: a sequence of distinct names, or K (names ``"task0"``...)."""
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise ValueError(f"tasks={tasks} must be a positive number of tasks or a list of names")
        return tuple(f"task{i}" for i in range(tasks))
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of task names or an int, got {tasks!r}")
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks is empty; give at least one task name")
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"task names must be non-empty strings, got {t!r} in {list(names)}")
    if len(set(names)) != len(names):
        dupes = sorted({t for t in names if names.count(t) > 1})
        raise ValueError(f"task names must be distinct; repeated: {dupes}")
    return names


class MultiTaskModel(nn.Module):
    """A network with one output per task.

    Subclasses call ``super().__init__(tasks)``, build their modules, and implement
    :meth:`forward` and :meth:`task_parameters`; :meth:`shared_parameters` is everything else.

    Args:
        tasks: the task names (or their number K: names ``task0 ... task{K-1}``).
    """

    #: registry name, set by :func:`polytask.archs.register`.
    name: ClassVar[str] = ""
    #: Authors, title, venue and year of the paper the architecture implements.
    paper: ClassVar[str] = ""
    #: Whether :meth:`encode` / :meth:`decode` exist (one shared representation).
    has_shared_representation: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str] | int) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = check_tasks(tasks)

    # -- tasks ---------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def check_task(self, task: str) -> str:
        """``task`` if it is one of :attr:`tasks`, else a clear error."""
        if task not in self.tasks:
            raise PolytaskError(
                f"unknown task {task!r} for {type(self).__name__}; its tasks are {list(self.tasks)}"
            )
        return task

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        raise NotImplementedError

    def encode(self, x: Any) -> Tensor:
        """The shared representation every task-specific module reads."""
        raise NotImplementedError(
            f"{type(self).__name__} has no single shared representation; use mode='params'"
        )

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        """Task outputs from the shared representation (``forward == decode ∘ encode``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no single shared representation; use mode='params'"
        )

    def aux_loss(self) -> Tensor | None:
        """The architecture's own regularisation term after the last forward (sluice's
        orthogonality loss, DSelect-k's entropy, ...), which the trainer adds to the
        balanced objective; ``None`` when it has none."""
        return None

    def loss_terms(self, losses: Tensor, *, progress: float) -> Tensor | None:
        """A term built from the task losses' graph (ASTMT's adversarial discriminator loss),
        which the trainer backpropagates before the balancing method frees that graph;
        ``progress`` is the fraction of training done, in [0, 1]. ``None`` when it has none."""
        return None

    # -- parameters ----------------------------------------------------------------------
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only ``task`` uses (its head, its tower, its gate, ...)."""
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters not owned by any single task (what balancing methods balance)."""
        owned = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        for p in self.parameters():
            if id(p) not in owned:
                yield p

    def check_partition(self) -> None:
        """Raise if the shared and per-task parameters are not an exact partition."""
        seen: dict[int, str] = {}
        groups = [("shared", list(self.shared_parameters()))]
        groups += [(f"task {t!r}", list(self.task_parameters(t))) for t in self.tasks]
        for label, params in groups:
            for p in params:
                if id(p) in seen:
                    raise PolytaskError(
                        f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} is in both "
                        f"{seen[id(p)]} and {label}"
                    )
                seen[id(p)] = label
        missing = [tuple(p.shape) for p in self.parameters() if id(p) not in seen]
        if missing:
            raise PolytaskError(
                f"{type(self).__name__}: parameters of shapes {missing} are neither shared nor "
                "owned by a task"
            )

    def _select(self, outputs: dict[str, Tensor], task: str | None) -> dict[str, Tensor] | Tensor:
        return outputs if task is None else outputs[self.check_task(task)]
