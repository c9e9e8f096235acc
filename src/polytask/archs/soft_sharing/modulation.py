"""Modulation module: per-task channel-wise scaling of a shared network's feature maps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    check_positions,
    per_task_modules,
    stage_channels,
)

__all__ = ["Modulation"]


@register("modulation")
class Modulation(MultiTaskModel):
    """Task-specific channel-wise modulation of one shared network.

    Zhao, Li, Shen, Liang & Wu, "A Modulation Module for Multi-task Learning with
    Applications in Image Retrieval", ECCV 2018. One shared network; after each chosen stage
    task t's feature map is multiplied channel-wise by a learned vector ``w_t^{(j)}``
    (``x ← w_t ⊙ x``), so that weakly related tasks can use the shared filters differently
    and their gradients on the shared weights conflict less. Each task's head reads its
    modulated features. A forward therefore runs the shared network once per task.

    Hyper-parameters:
        modulate_after: the stages followed by a modulation (default every stage; the paper
            inserts the module after the convolution layers of the shared network).
        channels: the modulated stages' channel counts (inferred from each stage's last
            conv/linear/norm layer when omitted).
        The vectors start at one, so training starts from the plain shared network.

    Note: BatchNorm layers of the shared network see each task's batch in turn, so their
    running statistics average over the tasks' modulated features.

    Args:
        tasks: task names or their number K.
        stages: the shared network as a list of stage modules ([B, C, ...] -> [B, C', ...]).
        heads: each task's head (module copied per task, ``factory(task)``, or a dict).

    Parameters of a task: its modulation vectors and its head.
    """

    paper = (
        "Zhao, Li, Shen, Liang & Wu, A Modulation Module for Multi-task Learning with "
        "Applications in Image Retrieval, ECCV 2018"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: Sequence[nn.Module],
        heads: ModuleSpec,
        *,
        modulate_after: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tasks)
        if isinstance(stages, nn.Module) and not isinstance(stages, (nn.Sequential, nn.ModuleList)):
            raise TypeError(f"stages must be a list of stages, got one {type(stages).__name__}")
        self.stages = nn.ModuleList(list(stages))
        if not len(self.stages):
            raise ValueError("stages is empty; give at least one stage")
        self.modulate_after = check_positions(modulate_after, len(self.stages), "modulate_after")
        widths = stage_channels(self.stages, self.modulate_after, channels, "modulate_after")
        self.modulation = nn.ModuleDict(
            {
                t: nn.ParameterDict(
                    {str(j): nn.Parameter(torch.ones(widths[j])) for j in self.modulate_after}
                )
                for t in self.tasks
            }
        )
        self.heads = per_task_modules(self.tasks, heads, "heads")

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        out = {}
        for t in wanted:
            h = x
            for j, stage in enumerate(self.stages):
                h = stage(h)
                if str(j) in self.modulation[t]:
                    w = self.modulation[t][str(j)]
                    h = h * w.reshape((1, -1) + (1,) * (h.dim() - 2))
            out[t] = self.heads[t](h)
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield from self.modulation[task].parameters()
        yield from self.heads[task].parameters()
