"""A task: its name, its loss and its metrics (each with its direction)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from polytask.tasks.metrics import TaskMetric

__all__ = ["SplitMetrics", "Task", "TaskSet"]


@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Args:
        name: the task's name (the key of its output and target).
        loss: ``loss(output, target) -> scalar``, skipping missing labels
            (see :mod:`polytask.tasks.losses`).
        metrics: factories of the task's :class:`~polytask.tasks.metrics.TaskMetric` s; each
            split gets fresh instances from :meth:`make_metrics`.
        label_kind: how missing labels are marked (``"auto"``, ``"depth"``, ``"normals"``;
            see :func:`polytask.tasks.losses.has_labels`).
    """

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: Sequence[Callable[[], TaskMetric]] = field(default_factory=tuple)
    label_kind: str = "auto"

    def make_metrics(self) -> list[TaskMetric]:
        return [factory() for factory in self.metrics]

    @property
    def directions(self) -> dict[str, bool]:
        """``"task/metric"`` -> whether higher is better, for every metric of the task."""
        out: dict[str, bool] = {}
        for metric in self.make_metrics():
            for key, higher in metric.directions.items():
                out[f"{self.name}/{key}"] = higher
        return out


class TaskSet:
    """The tasks of a problem, in order, with their metrics accumulated per split."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        names = [t.name for t in tasks]
        if not names:
            raise ValueError("a TaskSet needs at least one Task")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {names}")
        self.tasks = list(tasks)
        self.names = names

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    @property
    def directions(self) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for task in self.tasks:
            out.update(task.directions)
        return out

    def losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> list[Tensor]:
        """Each task's loss, in task order; a task missing from ``outputs`` or ``targets`` is
        an error that names it."""
        for label, mapping in (("outputs", outputs), ("targets", targets)):
            missing = [n for n in self.names if n not in mapping]
            if missing:
                raise KeyError(f"{label} has no entry for task(s) {missing}; got {list(mapping)}")
        return [task.loss(outputs[task.name], targets[task.name]) for task in self.tasks]


class SplitMetrics:
    """Fresh metrics of every task for one evaluation pass over a split."""

    def __init__(self, tasks: TaskSet) -> None:
        self.tasks = tasks
        self.metrics = {task.name: task.make_metrics() for task in tasks}

    def to(self, device) -> SplitMetrics:
        for metrics in self.metrics.values():
            for m in metrics:
                m.to(device)
        return self

    def update(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        for name, metrics in self.metrics.items():
            if name not in outputs or name not in targets:
                continue  # multi-input batches carry only their own task
            for m in metrics:
                m.update(outputs[name].detach(), targets[name])

    def compute(self) -> dict[str, float]:
        """``"task/metric"`` -> value (synchronised across DDP ranks by torchmetrics)."""
        out: dict[str, float] = {}
        for name, metrics in self.metrics.items():
            for m in metrics:
                for key, value in m.compute().items():
                    out[f"{name}/{key}"] = value
        return out
