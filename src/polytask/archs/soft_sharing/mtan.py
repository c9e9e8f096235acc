"""MTAN: a shared multi-stage network plus one soft-attention network per task."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    infer_out_channels,
    per_task_modules,
    resize_to,
)
from polytask.errors import InvalidHyperparameterError

__all__ = ["MTAN", "attention_block", "conv_block"]


def attention_block(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """g(·) of the paper: [1x1 conv, BN, ReLU] then [1x1 conv, BN, sigmoid] (official code)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, 1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """f(·) of the paper: a 3x3 conv, BN, ReLU (the official SegNet-MTAN ``conv_layer``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


@register("mtan")
class MTAN(MultiTaskModel):
    """Multi-Task Attention Network: task attention masks over a shared network's stages.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. A
    shared network of J stages; stage j is split into its body and its last block, with
    outputs ``u_j^b`` and ``u_j = last_j(u_j^b)``. Task t has one attention module per
    stage: ``a_j = g_j^t([u_j^b, f_{j-1}(a_{j-1})]) ⊙ u_j`` (for j = 1 only ``u_1^b`` is read),
    where g (1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid) is the task's own mask and f (3x3
    conv-BN-ReLU, shared by the tasks) maps the attended features to the next stage's body
    width, followed by max pooling (or bilinear up-sampling) to its size. Task t's head
    reads ``a_J``.

    Hyper-parameters (official defaults):
        attention_reduction: g's hidden width is the stage width divided by this; 1 as in the
            official SegNet-MTAN (the official ResNet-MTAN and LibMTL divide by the ResNet
            block expansion, 4 for bottleneck ResNets).
        refine: factory ``(in_channels, out_channels) -> module`` for f; default
            :func:`conv_block` (official SegNet-MTAN; the official ResNet-MTAN and LibMTL
            use a residual block here).
        channels: per stage ``(body_channels, stage_channels)``; inferred from the body's and
            last block's last conv/linear/norm layer when omitted.

    As in the official ResNet-MTAN and LibMTL there is no f after the last stage (the task
    heads follow). Image features ([B, C, H, W]) only.

    Args:
        tasks: task names or their number K.
        stages: the shared network as a list of stages, each an ``nn.Sequential`` of at
            least two modules (split into ``stage[:-1]`` and ``stage[-1]``, as the official
            code splits a ResNet layer before its last block) or a pair ``(body, last)``.
        heads: each task's head on ``a_J`` (module copied per task, ``factory(task)``, or
            ``{task: module}``).

    Parameters of a task: its attention modules and its head; the shared network and the
    f blocks are shared.
    """

    paper = "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019"

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: Sequence[nn.Module | tuple[nn.Module, nn.Module]],
        heads: ModuleSpec,
        *,
        channels: Sequence[tuple[int, int]] | None = None,
        refine: Callable[[int, int], nn.Module] | None = None,
        attention_reduction: int = 1,
    ) -> None:
        super().__init__(tasks)
        if isinstance(attention_reduction, bool) or attention_reduction < 1:
            raise InvalidHyperparameterError(
                f"attention_reduction={attention_reduction!r} must be an int >= 1"
            )
        bodies, lasts = _split_stages(stages)
        self.bodies = nn.ModuleList(bodies)
        self.lasts = nn.ModuleList(lasts)
        widths = _widths(bodies, lasts, channels)
        refine = conv_block if refine is None else refine
        self.refine = nn.ModuleList(
            [refine(widths[j][1], widths[j + 1][0]) for j in range(len(widths) - 1)]
        )
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    [
                        attention_block(
                            body if j == 0 else 2 * body,
                            max(1, out // attention_reduction),
                            out,
                        )
                        for j, (body, out) in enumerate(widths)
                    ]
                )
                for t in self.tasks
            }
        )
        self.heads = per_task_modules(self.tasks, heads, "heads")

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        shared = []
        h = x
        for body, last in zip(self.bodies, self.lasts):
            b = body(h)
            h = last(b)
            shared.append((b, h))
        out = {}
        for t in wanted:
            a = None
            for j, (b, u) in enumerate(shared):
                if j == 0:
                    mask = self.attention[t][0](b)
                else:
                    prev = resize_to(self.refine[j - 1](a), b.shape[2:])
                    mask = self.attention[t][j](torch.cat([b, prev], dim=1))
                a = mask * u
            out[t] = self.heads[t](a)
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()


def _split_stages(
    stages: Sequence[nn.Module | tuple[nn.Module, nn.Module]],
) -> tuple[list[nn.Module], list[nn.Module]]:
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"stages must be a list of stages, got one {type(stages).__name__}")
    bodies, lasts = [], []
    for j, stage in enumerate(stages):
        if isinstance(stage, nn.Sequential):
            if len(stage) < 2:
                raise ValueError(
                    f"stage {j} is an nn.Sequential of {len(stage)} module(s); MTAN reads the "
                    "output before the stage's last block, so give at least two modules or a "
                    "pair (body, last)"
                )
            bodies.append(stage[:-1])
            lasts.append(stage[-1])
        elif isinstance(stage, (tuple, list)) and len(stage) == 2:
            body, last = stage
            if not isinstance(body, nn.Module) or not isinstance(last, nn.Module):
                raise TypeError(f"stage {j}: (body, last) must both be nn.Modules")
            bodies.append(body)
            lasts.append(last)
        else:
            raise TypeError(
                f"stage {j} must be an nn.Sequential of >= 2 modules or a pair (body, last); "
                f"got {type(stage).__name__}"
            )
    if not bodies:
        raise ValueError("stages is empty; give at least one stage")
    return bodies, lasts


def _widths(
    bodies: list[nn.Module],
    lasts: list[nn.Module],
    channels: Sequence[tuple[int, int]] | None,
) -> list[tuple[int, int]]:
    if channels is not None:
        pairs = [tuple(int(c) for c in pair) for pair in channels]
        if len(pairs) != len(bodies) or any(len(p) != 2 for p in pairs):
            raise ValueError(
                f"channels must hold one (body_channels, stage_channels) pair per stage "
                f"({len(bodies)} stages); got {list(channels)}"
            )
        return pairs  # type: ignore[return-value]
    out = []
    for j, (body, last) in enumerate(zip(bodies, lasts)):
        b = infer_out_channels(body)
        u = infer_out_channels(last)
        if b is None or u is None:
            raise ValueError(
                f"cannot infer the channel counts of stage {j} (no conv/linear/norm layer); "
                "pass channels=[(body_channels, stage_channels), ...]"
            )
        out.append((b, u))
    return out
