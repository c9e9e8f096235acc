"""Task routing: one backbone whose channels are masked by a fixed random binary mask per
task, so that each task uses its own subset of the shared units."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.transformer_blocks import per_task
from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = ["TaskRouter", "TaskRouting", "routing_masks"]


def routing_masks(
    num_tasks: int, units: int, sigma: float, generator: torch.Generator | None = None
) -> Tensor:
    """[K, units] binary masks, each with exactly ``int(units * sigma)`` zeros at random.

    Each task's zeros are an independent uniformly random subset, as in the official code
    (``argsort`` of uniform noise).
    """
    if not 0.0 <= sigma < 1.0:
        raise InvalidHyperparameterError(f"sigma={sigma} must be in [0, 1)")
    masks = torch.ones(num_tasks, units)
    off = int(units * sigma)
    order = torch.rand(num_tasks, units, generator=generator).argsort(dim=1)
    masks.scatter_(1, order[:, :off], 0.0)
    return masks


class TaskRouter(nn.Module):
    """Multiplies channel c of its input (axis 1) by ``mask[task, c]`` (a fixed buffer)."""

    def __init__(self, masks: Tensor) -> None:
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, x: Tensor, task: int) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.masks.shape[1]:
            raise PolytaskError(
                f"task router over {self.masks.shape[1]} channels got input {tuple(x.shape)}; "
                "check `channels` against the stages' outputs"
            )
        m = self.masks[task].to(x)
        return x * m.view(1, -1, *([1] * (x.dim() - 2)))


def _default_stage(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class _PoolHead(nn.Module):
    def __init__(self, channels: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(2).mean(-1) if x.dim() > 2 else x)


@register("task_routing")
class TaskRouting(MultiTaskModel):
    """Task routing layers: fixed random per-task channel masks in a shared backbone.

    Strezoski, van Noord & Worring, "Many Task Learning With Task Routing", ICCV 2019
    (official code gstrezoski/TaskRouting). After each stage l of the backbone a task
    routing layer multiplies the C_l channels by task t's binary mask, drawn once at
    construction with exactly ``int(C_l * sigma)`` zeros; a task therefore trains and uses
    only its routed subset of the shared units, and tasks overlap in the rest. Each task has
    its own head. A task's forward runs the backbone with its masks (K passes for all tasks).

    Parameters: the backbone is shared (the masks are fixed buffers, not parameters); each
    task owns its head.

    Args:
        tasks: task names or K.
        stages: the backbone as a list of modules, each [B, C_{l-1}, ...] -> [B, C_l, ...];
            default two conv3x3-BN-ReLU stages of widths ``channels``.
        channels: C_l of each stage's output (default (8, 16)); required with ``stages``.
        heads: per task (list or dict) a module on the last stage's output; default global
            average pooling and a linear layer to ``out_features``.
        out_features: outputs of each default head (a value, list or dict; default 1).
        in_channels: input channels of the default stages (default 3).
        sigma: fraction of each layer's units masked out per task (official default 0.5).
        seed: seed of the masks (they are part of the architecture, so fixed by default).

    Departures: the official layer sits between the convolution (and BN) and the ReLU; it is
    applied after each given stage here, which is the same for binary masks when the stage
    ends in a ReLU. The official code masks ``input.data`` in place; here the masking is an
    ordinary differentiable product and the masks are buffers (the official ones are
    ``nn.Parameter``s that receive no gradient).
    """

    paper: ClassVar[str] = (
        "Strezoski, van Noord & Worring, Many Task Learning With Task Routing, ICCV 2019"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        stages: Sequence[nn.Module] | None = None,
        channels: Sequence[int] | None = None,
        heads: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
        out_features: int | Sequence[int] | Mapping[str, int] = 1,
        in_channels: int = 3,
        sigma: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks)
        if stages is None:
            channels = tuple(channels or (8, 16))
            widths = (in_channels, *channels)
            stages = [_default_stage(a, b) for a, b in itertools.pairwise(widths)]
        elif channels is None or len(channels) != len(stages):
            raise InvalidHyperparameterError(
                f"channels={channels!r} must give the output width of each of the "
                f"{len(stages)} stages"
            )
        self.channels, self.sigma, self.seed = tuple(channels), sigma, seed
        generator = torch.Generator().manual_seed(seed)
        self.stages = nn.ModuleList(stages)
        self.routers = nn.ModuleList(
            TaskRouter(routing_masks(self.num_tasks, c, sigma, generator)) for c in self.channels
        )
        if heads is None:
            outs = per_task(out_features, self.tasks, "out_features")
            heads = [_PoolHead(self.channels[-1], o) for o in outs]
        self.heads = nn.ModuleDict(dict(zip(self.tasks, per_task(heads, self.tasks, "heads"))))

    def routed(self, x: Tensor, task: str) -> Tensor:
        """The last stage's output with ``task``'s routing."""
        k = self.tasks.index(self.check_task(task))
        for stage, router in zip(self.stages, self.routers):
            x = router(stage(x), k)
        return x

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        names = self.tasks if task is None else (self.check_task(task),)
        out = {t: self.heads[t](self.routed(x, t)) for t in names}
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[self.check_task(task)].parameters()
