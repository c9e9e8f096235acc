"""Cross-stitch networks: one network column per task, linearly mixed after chosen stages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    StagesSpec,
    check_positions,
    per_task_modules,
    per_task_stages,
    stage_channels,
)
from polytask.archs.soft_sharing._stitch import StitchUnit, imbalanced_matrix

__all__ = ["CrossStitch"]


@register("cross_stitch")
class CrossStitch(MultiTaskModel):
    """Cross-stitch networks: per-task columns whose activations are linearly mixed.

    Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task Learning",
    CVPR 2016. Each task has its own copy of the network (a *column*, built from the user's
    stages). After each chosen stage a cross-stitch unit replaces column t's activation by
    ``x̃_t = Σ_s α_ts x_s`` (eq. 1 of the paper, generalised from 2 to K tasks); every
    column's next stage reads its mixed activation; each task's head reads its column's end.

    Hyper-parameters (paper defaults):
        alpha_self, alpha_other: the initial α_S (diagonal) and α_D (off-diagonal), 0.9 and
            0.1, the paper's best initialisation for two tasks (Sec. 5). ``(1, 0)`` is the
            identity initialisation: the columns start as K independent networks. With
            K > 2 tasks a row sums to α_S + (K-1)·α_D, as in the Vandenhende et al. code.
        stitch_after: the stage indices followed by a unit (default every stage; the paper
            stitches after every pooling layer and fc6/fc7 of AlexNet).
        channel_wise: one α per channel instead of one scalar per task pair (the
            channel-wise variant of the unit, as in the Vandenhende et al. MTL survey code);
            needs the stitched stages' channel counts (``channels``, or inferred from the
            stage's last conv/linear/norm layer).

    Note: the paper scales the learning rate of the units up (10^2 to 10^3 times the base
    rate) because α lives on a different scale from the network weights;
    :meth:`stitch_parameters` gives them for a separate optimiser parameter group.

    Args:
        tasks: task names or their number K.
        stages: the network as a list of stage modules (copied once per task), a
            ``factory(task)`` returning such a list, or ``{task: stages}`` (say, per-task
            pretrained networks). Every stage maps a tensor [B, C, ...] to one.
        heads: each task's head after the last stage (module copied per task,
            ``factory(task)``, or ``{task: module}``).

    Parameters of a task: its head, its column's stages after the last unit, and its row of
    the last unit; everything before the last unit reaches every task and is shared.
    """

    paper = (
        "Misra, Shrivastava, Gupta & Hebert, Cross-stitch Networks for Multi-task Learning, "
        "CVPR 2016"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: StagesSpec,
        heads: ModuleSpec,
        *,
        stitch_after: Sequence[int] | None = None,
        alpha_self: float = 0.9,
        alpha_other: float = 0.1,
        channel_wise: bool = False,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tasks)
        self.columns = per_task_stages(self.tasks, stages, "stages")
        self.heads = per_task_modules(self.tasks, heads, "heads")
        num_stages = len(self.columns[self.tasks[0]])
        self.stitch_after = check_positions(stitch_after, num_stages, "stitch_after")
        widths = stage_channels(
            self.columns[self.tasks[0]],
            self.stitch_after,
            channels,
            "stitch_after",
            required=channel_wise,
        )
        init = imbalanced_matrix(self.num_tasks, 1, alpha_self, alpha_other)
        self.units = nn.ModuleDict(
            {
                str(i): StitchUnit(self.tasks, 1, init, widths[i] if channel_wise else None)
                for i in self.stitch_after
            }
        )

    def stitch_parameters(self) -> Iterator[nn.Parameter]:
        """The α of every cross-stitch unit (for a larger learning rate, see the paper)."""
        return self.units.parameters()

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        last = self.stitch_after[-1]
        feats = {t: x for t in self.tasks}
        for i in range(len(self.columns[self.tasks[0]])):
            alive = self.tasks if i <= last else wanted
            feats = {t: self.columns[t][i](feats[t]) for t in alive}
            if str(i) in self.units:
                feats = self.units[str(i)](feats, wanted if i == last else None)
        return self._select({t: self.heads[t](feats[t]) for t in wanted}, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        last = self.stitch_after[-1]
        yield from self.heads[task].parameters()
        for stage in list(self.columns[task])[last + 1 :]:
            yield from stage.parameters()
        yield self.units[str(last)].rows[task]
