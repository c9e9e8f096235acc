"""MTI-Net: multi-scale initial predictions, feature propagation, per-scale distillation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.decoder._blocks import BasicBlock, MultiModalDistillation, SEBlock, refinement
from polytask.archs.decoder._common import (
    KeepsIntermediate,
    check_outputs,
    fuse_scales,
    upsample_to,
)
from polytask.archs.registry import register

__all__ = ["FeaturePropagation", "MTINet"]


class FeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module (FPM) at one scale.

    The N tasks' features are concatenated ([B, N·C]); a non-linear map (two basic blocks
    through N·C/4 channels and a 1x1 conv back to N·C) gives, per channel and position, a
    softmax over the N tasks, which weights the concatenation; a basic block reduces it to
    C channels, and each task adds its own squeeze-and-excitation of that shared map to its
    features: ``out_t = SE_t(shared) + F_t``.

    Departure: the reference code takes the softmax over groups of N adjacent channels of
    the task-major concatenation (a reshape that mostly groups channels of one task); here
    it is over the N tasks for the same channel, as the paper describes the per-task mask.
    """

    def __init__(self, tasks: Sequence[str], channels: int, se_reduction: int) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        n = len(self.tasks)
        wide, narrow = n * channels, max(1, n * channels // 4)
        self.non_linear = nn.Sequential(
            BasicBlock(wide, narrow), BasicBlock(narrow, narrow), nn.Conv2d(narrow, wide, 1)
        )
        self.reduce = BasicBlock(wide, channels)
        self.se = nn.ModuleDict({t: SEBlock(channels, se_reduction) for t in self.tasks})

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        stacked = torch.stack([features[t] for t in self.tasks], dim=1)  # [B, N, C, H, W]
        b, n, c, h, w = stacked.shape
        logits = self.non_linear(stacked.reshape(b, n * c, h, w)).reshape(b, n, c, h, w)
        weighted = torch.softmax(logits, dim=1) * stacked
        shared = self.reduce(weighted.reshape(b, n * c, h, w))
        return {t: self.se[t](shared) + features[t] for t in self.tasks}


@register("mti_net")
class MTINet(KeepsIntermediate, MultiTaskModel):
    """MTI-Net: task interactions at several scales of a multi-scale backbone.

    Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interactions Networks
    for Multi-Task Learning", ECCV 2020. The user's backbone returns S feature maps, finest
    first, each (typically) half the size of the previous. From the coarsest scale up, every
    task (final and auxiliary) gets features ``F_t^s`` (two basic blocks on the backbone map,
    concatenated for s < S-1 with the task's up-sampled FPM output of the coarser scale) and
    an initial prediction (1x1 conv); a feature propagation module (FPM) mixes the tasks'
    features before they go one scale up (not at the finest scale). At each scale the
    PAD-Net distillation unit refines the final tasks' features; each final task's head
    up-samples its distilled features of all scales to the finest one, concatenates them,
    and predicts (1x1 conv-BN-ReLU, 1x1 conv: the reference code's HRNet head).

    The initial predictions of every scale are deeply supervised in the paper: after every
    forward :attr:`last_intermediate` holds ``{scale: {task: prediction}}`` and
    :meth:`forward_with_intermediate` returns it.

    Hyper-parameters (reference-code defaults):
        gate: the distillation gate, ``"source"`` (the reference code's spatial
            self-attention on the sending task, which MTI-Net uses) or ``"target"``.
        se_reduction: 16, the squeeze-and-excitation reduction of the FPM (at least one
            hidden unit is kept for narrow features).
        auxiliary: ``{name: channels}`` of tasks only predicted at the initial stage (the
            paper adds edges and normals on NYUD-v2).
        upsample: resize predictions to the input's spatial size (bilinear).

    Args:
        tasks: the final task names (or their number K).
        backbone: module mapping the input to a list of S >= 1 maps, finest first.
        backbone_channels: the S maps' channel counts.
        out_channels: output channels per final task (``{task: int}`` or one int for all).

    Parameters of a task: its distillation convs of every scale, its head and its initial
    1x1 convs (which only produce its intermediate predictions).
    """

    paper = (
        "Vandenhende, Georgoulis & Van Gool, MTI-Net: Multi-Scale Task Interactions Networks "
        "for Multi-Task Learning, ECCV 2020"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        backbone: nn.Module,
        backbone_channels: Sequence[int],
        out_channels: Mapping[str, int] | int,
        *,
        auxiliary: Mapping[str, int] | None = None,
        gate: str = "source",
        se_reduction: int = 16,
        upsample: bool = True,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        widths = [int(c) for c in backbone_channels]
        if not widths or any(c < 1 for c in widths):
            raise ValueError(f"backbone_channels={list(backbone_channels)} must be positive")
        outputs, aux = check_outputs(self.tasks, out_channels, auxiliary)
        every = {**outputs, **aux}
        self.backbone = backbone
        self.widths = tuple(widths)
        self.upsample = upsample
        self.auxiliary = tuple(aux)
        last = len(widths) - 1
        self.features = nn.ModuleList(
            [
                nn.ModuleDict(
                    {t: refinement(c + (widths[s + 1] if s < last else 0), c) for t in every}
                )
                for s, c in enumerate(widths)
            ]
        )
        self.initial = nn.ModuleList(
            [nn.ModuleDict({t: nn.Conv2d(c, o, 1) for t, o in every.items()}) for c in widths]
        )
        self.fpm = nn.ModuleDict(
            {
                str(s): FeaturePropagation(list(every), widths[s], se_reduction)
                for s in range(1, last + 1)
            }
        )
        self.distillation = nn.ModuleList(
            [MultiModalDistillation(self.tasks, list(every), c, gate) for c in widths]
        )
        total = sum(widths)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(total, total, 1),
                    nn.BatchNorm2d(total),
                    nn.ReLU(),
                    nn.Conv2d(total, o, 1),
                )
                for t, o in outputs.items()
            }
        )
        self.last_intermediate: dict[int, dict[str, Tensor]] = {}

    def forward_with_intermediate(
        self, x: Any, task: str | None = None
    ) -> tuple[dict[str, Tensor] | Tensor, dict[int, dict[str, Tensor]]]:
        """``(forward(x, task), {scale: {task: initial prediction}})``."""
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        maps = self.backbone(x)
        if isinstance(maps, Tensor):
            maps = [maps]
        if len(maps) != len(self.widths):
            raise ValueError(
                f"the backbone returned {len(maps)} feature maps but backbone_channels has "
                f"{len(self.widths)} entries"
            )
        size = x.shape[2:] if self.upsample else None
        last = len(maps) - 1
        feats: dict[int, dict[str, Tensor]] = {}
        intermediate: dict[int, dict[str, Tensor]] = {}
        propagated: dict[str, Tensor] | None = None
        for s in range(last, -1, -1):
            level = {}
            for t, branch in self.features[s].items():
                inp = maps[s]
                if propagated is not None:
                    inp = torch.cat([inp, upsample_to(propagated[t], inp.shape[2:])], dim=1)
                level[t] = branch(inp)
            feats[s] = level
            intermediate[s] = {
                t: self._resize(conv(level[t]), size) for t, conv in self.initial[s].items()
            }
            propagated = self.fpm[str(s)](level) if s > 0 else None
        distilled = [self.distillation[s](feats[s], wanted) for s in range(last + 1)]
        out = {
            t: self._resize(self.heads[t](fuse_scales([d[t] for d in distilled])), size)
            for t in wanted
        }
        self.last_intermediate = intermediate
        return self._select(out, task), intermediate

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        return self.forward_with_intermediate(x, task)[0]

    @staticmethod
    def _resize(y: Tensor, size: Any) -> Tensor:
        return y if size is None else upsample_to(y, size)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield from self.heads[task].parameters()
        for unit in self.distillation:
            yield from unit.message[task].parameters()
            yield from unit.attention[task].parameters()
        for initial in self.initial:
            yield from initial[task].parameters()
