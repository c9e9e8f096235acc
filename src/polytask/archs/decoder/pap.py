"""PAP-Net: task affinity matrices, fused across tasks, diffused through each task's features."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.decoder._blocks import refinement
from polytask.archs.decoder._common import (
    KeepsIntermediate,
    check_outputs,
    fuse_scales,
    upsample_to,
)
from polytask.archs.registry import register
from polytask.errors import InvalidHyperparameterError

__all__ = ["PAPNet", "affinity", "diffuse"]


def affinity(embedding: Tensor) -> Tensor:
    """Row-stochastic pairwise affinity [B, N, N] of a map [B, C, H, W] (N = H·W):
    ``A[i, j] = exp(<e_i, e_j>) / Σ_k exp(<e_i, e_k>)``."""
    e = embedding.flatten(2)  # [B, C, N]
    return torch.softmax(e.transpose(1, 2) @ e, dim=-1)


def diffuse(features: Tensor, matrix: Tensor, beta: float, steps: int) -> Tensor:
    """``X^{k+1} = β A X^k + (1-β) X^0`` for ``steps`` steps, on a map [B, C, H, W]."""
    b, c, h, w = features.shape
    x0 = features.flatten(2).transpose(1, 2)  # [B, N, C]
    x = x0
    for _ in range(steps):
        x = beta * (matrix @ x) + (1 - beta) * x0
    return x.transpose(1, 2).reshape(b, c, h, w)


@register("pap")
class PAPNet(KeepsIntermediate, MultiTaskModel):
    """PAP-Net: pattern-affinitive propagation across tasks for dense prediction.

    Zhang, Cui, Xu, Yan, Sebe & Yang, "Pattern-Affinitive Propagation across Depth, Surface
    Normal and Semantic Segmentation", CVPR 2019. After the user's backbone, each task
    (final and auxiliary) has a branch giving features ``F_t`` (two residual blocks) and an
    initial prediction (1x1 conv, deeply supervised). *Affinity learning*: a per-task 1x1
    conv embeds ``F_t`` and the pairwise affinity ``A_t`` ([N, N] over the positions of the
    affinity map) is the row-normalised exponential of the embeddings' dot products.
    *Cross-task propagation*: each final task fuses all tasks' affinities with its own
    learned convex weights, ``Â_t = Σ_s softmax(w_t)_s A_s``. *Task-specific propagation*:
    a diffusion ``X^{k+1} = β Â_t X^k + (1-β) X^0`` from ``X^0 = F_t``; a per-task decoder
    (two residual blocks, 1x1 conv) predicts from the diffused features.

    After every forward :attr:`last_intermediate` holds the initial predictions
    ``{task: prediction}``; :meth:`forward_with_intermediate` returns them too.

    Hyper-parameters:
        channels: width of the task features (256 in the Vandenhende et al. code family).
        beta, steps: diffusion strength and number of iterations; 0.05 and 3 as in the
            PAP-Net port to the Vandenhende et al. code by D. Sinodinos (the paper has no
            public code; tune them).
        affinity_size: spatial size (h, w) the affinity and the diffusion work at (features
            resized bilinearly; the paper and the port work at a reduced resolution, the
            port at 1/4 of the image) — N = h·w, so the matrices take B·N² memory. ``None``:
            the backbone's resolution.
        auxiliary: ``{name: channels}`` of tasks only predicted initially; their affinities
            still enter the fusion.
        upsample: resize predictions to the input's spatial size (bilinear).

    Departures (the paper gives no code): the affinity is normalised by a softmax over each
    row, which keeps every row positive and summing to one (the port row-normalises cosine
    similarities, which can be negative); the fusion weights are a softmax per task (as in
    the port); diffusion runs on ``F_t`` itself.

    Args:
        tasks: the final task names (or their number K).
        backbone: module mapping the input to a feature map [B, C, h, w] (or a list of maps,
            resized to the first one's size and concatenated).
        backbone_channels: C (the total over the list).
        out_channels: output channels per final task (``{task: int}`` or one int for all).

    Parameters of a task: its fusion weights, its decoder and its initial 1x1 conv.
    """

    paper = (
        "Zhang, Cui, Xu, Yan, Sebe & Yang, Pattern-Affinitive Propagation across Depth, "
        "Surface Normal and Semantic Segmentation, CVPR 2019"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        backbone: nn.Module,
        backbone_channels: int,
        out_channels: Mapping[str, int] | int,
        *,
        auxiliary: Mapping[str, int] | None = None,
        channels: int = 256,
        beta: float = 0.05,
        steps: int = 3,
        affinity_size: int | Sequence[int] | None = None,
        upsample: bool = True,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not 0.0 <= beta <= 1.0:
            raise InvalidHyperparameterError(f"beta={beta} must be in [0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InvalidHyperparameterError(f"steps={steps!r} must be an int >= 0")
        outputs, aux = check_outputs(self.tasks, out_channels, auxiliary)
        every = {**outputs, **aux}
        self.backbone = backbone
        self.beta, self.steps, self.upsample = float(beta), steps, upsample
        if isinstance(affinity_size, int):
            affinity_size = (affinity_size, affinity_size)
        self.affinity_size = None if affinity_size is None else tuple(affinity_size)
        self.auxiliary = tuple(aux)
        self.sources = tuple(every)
        self.features = nn.ModuleDict({t: refinement(backbone_channels, channels) for t in every})
        self.initial = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in every.items()})
        self.embedding = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in every})
        # Zero logits: every task's affinity starts with the same weight.
        self.fusion = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(len(every))) for t in self.tasks}
        )
        self.decoders = nn.ModuleDict(
            {
                t: nn.Sequential(refinement(channels, channels), nn.Conv2d(channels, c, 1))
                for t, c in outputs.items()
            }
        )
        self.last_intermediate: dict[str, Tensor] = {}

    def affinities(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's affinity matrix [B, N, N] from its features ``F_t``."""
        return {t: affinity(self._shrink(self.embedding[t](feats[t]))) for t in self.sources}

    def fuse(self, matrices: Mapping[str, Tensor], task: str) -> Tensor:
        """``Â_t = Σ_s softmax(w_t)_s A_s``."""
        weights = torch.softmax(self.fusion[task], dim=0)
        return sum(w * matrices[s] for w, s in zip(weights, self.sources))

    def forward_with_intermediate(
        self, x: Any, task: str | None = None
    ) -> tuple[dict[str, Tensor] | Tensor, dict[str, Tensor]]:
        """``(forward(x, task), {task: initial prediction})``."""
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        z = self.backbone(x)
        if isinstance(z, (list, tuple)):
            z = fuse_scales(z)
        feats = {t: branch(z) for t, branch in self.features.items()}
        size = x.shape[2:] if self.upsample else None
        intermediate = {t: self._resize(self.initial[t](f), size) for t, f in feats.items()}
        matrices = self.affinities(feats)
        out = {}
        for t in wanted:
            diffused = diffuse(
                self._shrink(feats[t]), self.fuse(matrices, t), self.beta, self.steps
            )
            out[t] = self._resize(self.decoders[t](diffused), size)
        self.last_intermediate = intermediate
        return self._select(out, task), intermediate

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        return self.forward_with_intermediate(x, task)[0]

    def _shrink(self, f: Tensor) -> Tensor:
        return f if self.affinity_size is None else upsample_to(f, self.affinity_size)

    @staticmethod
    def _resize(y: Tensor, size: Any) -> Tensor:
        return y if size is None else upsample_to(y, size)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield self.fusion[task]
        yield from self.decoders[task].parameters()
        yield from self.initial[task].parameters()
