"""Shared-bottom: one bottom network shared by all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.experts._blocks import (
    ModuleSpec,
    TowerSpec,
    build_module,
    build_towers,
    check_positive,
    flat_input,
    output_features,
)
from polytask.archs.registry import register

__all__ = ["SharedBottom"]


@register("shared_bottom")
class SharedBottom(MultiTaskModel):
    """Shared-bottom multi-task network: ``y_k = h_k(f(x))``.

    The baseline of Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018 (section 3.1, eq. 1,
    after Caruana, 1997): a bottom network f shared by every task, then one tower h_k per
    task. The paper tunes the sizes per data set (no defaults); its census experiments use
    ReLU MLPs.

    Args:
        tasks: task names or their number.
        in_features: the number of input features (``x.flatten(1)``'s width).
        bottom: hidden widths of the shared ReLU MLP, or a factory ``(in_features) -> module``.
        tower: hidden widths of each task's ReLU MLP tower (then a linear layer to
            ``out_features``; ``[]`` for a linear tower), or a factory
            ``(task, in_features) -> module``.
        out_features: outputs per task (int, or a mapping task -> int); MLP towers only.
        bottom_features: the flattened output size of a factory bottom (needed by MLP towers).

    The bottom's output is the shared representation (:meth:`encode`); the towers are the
    task parameters.
    """

    paper = (
        "Ma, Zhao, Yi, Chen, Hong & Chi, Modeling Task Relationships in Multi-task Learning "
        "with Multi-gate Mixture-of-Experts, KDD 2018 (shared-bottom baseline, eq. 1)"
    )
    has_shared_representation = True

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        bottom: ModuleSpec,
        tower: TowerSpec,
        out_features: int | Mapping[str, int] = 1,
        bottom_features: int | None = None,
    ) -> None:
        super().__init__(tasks)
        self.in_features = check_positive("in_features", in_features)
        width = output_features("bottom", bottom, bottom_features)
        self.bottom = build_module("bottom", bottom, in_features)
        self.towers = build_towers(self.tasks, tower, width, out_features)

    def encode(self, x: Tensor) -> Tensor:
        flat_input(x, self.in_features, type(self).__name__)
        return self.bottom(x)

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            return self.towers[self.check_task(task)](features)
        return {t: self.towers[t](features) for t in self.tasks}

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        return self.decode(self.encode(x), task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.towers[self.check_task(task)].parameters()
