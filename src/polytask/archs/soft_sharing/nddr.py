"""NDDR-CNN: per-task columns fused after chosen stages by 1x1 conv + BN + ReLU (NDDR layers)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    StagesSpec,
    check_positions,
    per_task_modules,
    per_task_stages,
    resize_to,
    stage_channels,
)

__all__ = ["NDDR", "NDDRLayer", "NDDRShortcut"]

_PAPER = (
    "Gao, Ma, Zhao, Liu & Yuille, NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by "
    "Neural Discriminative Dimensionality Reduction, CVPR 2019"
)


class NDDRLayer(nn.Module):
    """One NDDR layer: for each task, ReLU(BN(W_t · concat_s(x_s))) with a 1x1 conv W_t.

    W_t ([C, K·C]) starts as ``alpha`` times the identity on task t's block and ``beta``
    times the identity on every other task's block (the paper's diagonal initialisation).
    Features may be [B, C, H, W] or [B, C] (treated as 1x1 maps).
    """

    def __init__(
        self, tasks: Sequence[str], channels: int, alpha: float, beta: float, momentum: float
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        k = len(self.tasks)
        self.reduce = nn.ModuleDict()
        for i, t in enumerate(self.tasks):
            conv = nn.Conv2d(k * channels, channels, 1, bias=False)
            with torch.no_grad():
                weight = torch.zeros(channels, k * channels)
                for j in range(k):
                    block = torch.eye(channels) * (alpha if j == i else beta)
                    weight[:, j * channels : (j + 1) * channels] = block
                conv.weight.copy_(weight.view(channels, k * channels, 1, 1))
            bn = nn.BatchNorm2d(channels, momentum=momentum)
            self.reduce[t] = nn.Sequential(conv, bn, nn.ReLU())

    def forward(
        self, features: dict[str, Tensor], targets: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        flat = next(iter(features.values())).dim() == 2
        xs = [features[t] for t in self.tasks]
        if flat:
            xs = [x[:, :, None, None] for x in xs]
        cat = torch.cat(xs, dim=1)
        out = {}
        for t in self.tasks if targets is None else targets:
            y = self.reduce[t](cat)
            out[t] = y[:, :, 0, 0] if flat else y
        return out


@register("nddr")
class NDDR(MultiTaskModel):
    """NDDR-CNN: per-task columns fused layerwise by discriminative dimensionality reduction.

    Gao, Ma, Zhao, Liu & Yuille, "NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by
    Neural Discriminative Dimensionality Reduction", CVPR 2019. One column per task (the
    user's stages, copied per task). After each chosen stage an NDDR layer concatenates the
    K columns' features ([B, K·C, ...]) and maps them back to C channels per task with a
    task-specific 1x1 conv + BatchNorm + ReLU; each column continues from its reduced
    features and ends in its task head.

    Hyper-parameters (paper defaults):
        alpha, beta: 0.9 and 0.1, the diagonal initialisation of the 1x1 conv (alpha on the
            task's own block, beta on the others); (1, 0) starts as independent networks.
        fuse_after: the stages followed by an NDDR layer (default every stage; the paper
            fuses after every pooling layer of VGG-16).
        bn_momentum: 0.05, the official code's BN decay of 0.95.
        channels: the fused stages' channel counts (inferred from each stage's last
            conv/linear/norm layer when omitted).

    Note: the paper (and official code, ``--nddr-mult 100``) trains the NDDR layers with a
    100x larger learning rate than the pretrained columns; :meth:`nddr_parameters` gives
    them for a separate optimiser parameter group. Weight decay on them is part of the
    method (the "DR" regulariser); set it in the optimiser.

    Args:
        tasks: task names or their number K.
        stages: the network as a list of stage modules (copied once per task), a
            ``factory(task)`` returning one, or ``{task: stages}`` (per-task pretrained
            networks, as the paper starts from single-task networks). Features are
            [B, C, H, W] or [B, C].
        heads: each task's head (module copied per task, ``factory(task)``, or a dict).

    Parameters of a task: its head, its column's stages after the last NDDR layer, and its
    branch of the last NDDR layer.
    """

    paper = _PAPER
    _shortcut = False

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: StagesSpec,
        heads: ModuleSpec,
        *,
        fuse_after: Sequence[int] | None = None,
        alpha: float = 0.9,
        beta: float = 0.1,
        channels: Sequence[int] | None = None,
        bn_momentum: float = 0.05,
    ) -> None:
        super().__init__(tasks)
        self.columns = per_task_stages(self.tasks, stages, "stages")
        self.heads = per_task_modules(self.tasks, heads, "heads")
        num_stages = len(self.columns[self.tasks[0]])
        self.fuse_after = check_positions(fuse_after, num_stages, "fuse_after")
        widths = stage_channels(
            self.columns[self.tasks[0]], self.fuse_after, channels, "fuse_after"
        )
        self.nddr = nn.ModuleDict(
            {
                str(i): NDDRLayer(self.tasks, widths[i], alpha, beta, bn_momentum)
                for i in self.fuse_after
            }
        )
        if self._shortcut:
            total, last = sum(widths.values()), widths[self.fuse_after[-1]]
            self.shortcut = nn.ModuleDict(
                {
                    t: nn.Sequential(
                        nn.Conv2d(total, last, 1, bias=False),
                        nn.BatchNorm2d(last, momentum=bn_momentum),
                        nn.ReLU(),
                    )
                    for t in self.tasks
                }
            )

    def nddr_parameters(self) -> Iterator[nn.Parameter]:
        """The NDDR layers' (and shortcut convs') parameters, for their own lr group."""
        yield from self.nddr.parameters()
        if self._shortcut:
            yield from self.shortcut.parameters()

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        last = self.fuse_after[-1]
        feats = {t: x for t in self.tasks}
        fused: dict[str, list[Tensor]] = {t: [] for t in wanted}
        for i in range(len(self.columns[self.tasks[0]])):
            alive = self.tasks if i <= last else wanted
            feats = {t: self.columns[t][i](feats[t]) for t in alive}
            if str(i) in self.nddr:
                feats = self.nddr[str(i)](feats, wanted if i == last else None)
                if self._shortcut:
                    for t in wanted:
                        fused[t].append(feats[t])
            if self._shortcut and i == last:
                feats = {t: self._short(t, fused[t]) for t in wanted}
        return self._select({t: self.heads[t](feats[t]) for t in wanted}, task)

    def _short(self, task: str, fused: list[Tensor]) -> Tensor:
        ref = fused[-1]
        if ref.dim() != 4:
            raise ValueError(
                f"nddr_shortcut needs image features [B, C, H, W]; got shape {tuple(ref.shape)}"
            )
        size = ref.shape[2:]
        # The official code resizes every NDDR output bilinearly to the last one's size.
        cat = torch.cat([resize_to(f, size, down="bilinear") for f in fused], dim=1)
        return self.shortcut[task](cat)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        last = self.fuse_after[-1]
        yield from self.heads[task].parameters()
        for stage in list(self.columns[task])[last + 1 :]:
            yield from stage.parameters()
        yield from self.nddr[str(last)].reduce[task].parameters()
        if self._shortcut:
            yield from self.shortcut[task].parameters()


@register("nddr_shortcut")
class NDDRShortcut(NDDR):
    """NDDR-CNN-Shortcut: NDDR-CNN whose heads also read every NDDR layer's output.

    Gao, Ma, Zhao, Liu & Yuille, "NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by
    Neural Discriminative Dimensionality Reduction", CVPR 2019 (its shortcut variant). As
    :class:`NDDR`, and after the last NDDR layer each task concatenates the outputs of all
    its NDDR layers (bilinearly resized to the last one's size, as in the official code) and
    reduces them with a task-specific 1x1 conv + BN + ReLU to the last fused stage's width;
    its column and head continue from there. Image features only.
    Same hyper-parameters and defaults as :class:`NDDR`.
    """

    paper = _PAPER
    _shortcut = True
