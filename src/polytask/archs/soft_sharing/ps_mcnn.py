"""PS-MCNN: task-specific networks and a shared network exchanging features at every stage."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import ModuleSpec, per_task_modules

__all__ = ["PSMCNN", "conv_pool_block"]


def conv_pool_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """One PS-MCNN stage: 3x3 conv, BN, ReLU, 2x2 max pooling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


@register("ps_mcnn")
class PSMCNN(MultiTaskModel):
    """Partially Shared Multi-task CNN: per-task networks plus a shared network.

    Cao, Li & Zhang, "Partially Shared Multi-Task Convolutional Neural Network with Local
    Constraint for Face Attribute Learning", CVPR 2018. K task-specific networks (TSNets)
    and one shared network (SNet) run side by side for J stages. At stage j > 1, task t's
    stage reads ``[t_{j-1}, s_{j-1}]`` (its own previous output and the SNet's) and the SNet
    reads ``[s_{j-1}, t1_{j-1}, ..., tK_{j-1}]`` (its own and every TSNet's); stage 1 of all
    networks reads the input. Task t's head reads ``[t_J, s_J]``.

    Hyper-parameters:
        task_channels: each TSNet's width per stage; shared_channels: the SNet's width per
            stage (same number of stages). The paper's face-attribute network uses narrow
            TSNets and a wider SNet; choose them for your data.
        block: factory ``(in_channels, out_channels) -> stage``, default
            :func:`conv_pool_block` (conv-BN-ReLU-max-pool, the paper's block type).

    Not included: the paper's local constraint loss (LCLoss) on identity pairs, which is a
    training loss on the data rather than part of the network.

    Args:
        tasks: task names (the paper's task groups) or their number K.
        in_channels: channels of the input images.
        heads: each task's head on ``task_channels[-1] + shared_channels[-1]`` channels
            (module copied per task, ``factory(task)``, or a dict).

    Parameters of a task: its head and its TSNet's last stage; earlier TSNet stages feed the
    SNet and so every task.
    """

    paper = (
        "Cao, Li & Zhang, Partially Shared Multi-Task Convolutional Neural Network with Local "
        "Constraint for Face Attribute Learning, CVPR 2018"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_channels: int,
        task_channels: Sequence[int],
        shared_channels: Sequence[int],
        heads: ModuleSpec,
        *,
        block: Callable[[int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__(tasks)
        task_channels, shared_channels = list(task_channels), list(shared_channels)
        if not task_channels or len(task_channels) != len(shared_channels):
            raise ValueError(
                f"task_channels {task_channels} and shared_channels {shared_channels} must "
                "give one width per stage, for the same (non-zero) number of stages"
            )
        for c in (in_channels, *task_channels, *shared_channels):
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"channel counts must be positive ints, got {c!r}")
        block = conv_pool_block if block is None else block
        k = self.num_tasks
        self.tsnets = nn.ModuleDict()
        for t in self.tasks:
            stages = []
            for j, width in enumerate(task_channels):
                cin = in_channels if j == 0 else task_channels[j - 1] + shared_channels[j - 1]
                stages.append(block(cin, width))
            self.tsnets[t] = nn.ModuleList(stages)
        snet = []
        for j, width in enumerate(shared_channels):
            cin = in_channels if j == 0 else shared_channels[j - 1] + k * task_channels[j - 1]
            snet.append(block(cin, width))
        self.snet = nn.ModuleList(snet)
        self.heads = per_task_modules(self.tasks, heads, "heads")

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        last = len(self.snet) - 1
        own = {t: x for t in self.tasks}
        shared = x
        for j, s_stage in enumerate(self.snet):
            alive = self.tasks if j < last else wanted
            if j == 0:
                new_own = {t: self.tsnets[t][0](x) for t in alive}
                new_shared = s_stage(x)
            else:
                new_own = {t: self.tsnets[t][j](torch.cat([own[t], shared], dim=1)) for t in alive}
                new_shared = s_stage(torch.cat([shared, *(own[t] for t in self.tasks)], dim=1))
            own, shared = new_own, new_shared
        out = {t: self.heads[t](torch.cat([own[t], shared], dim=1)) for t in wanted}
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield from self.tsnets[task][-1].parameters()
        yield from self.heads[task].parameters()
