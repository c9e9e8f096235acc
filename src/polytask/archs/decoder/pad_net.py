"""PAD-Net: intermediate task predictions, multi-modal distillation, final predictions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.decoder._blocks import MultiModalDistillation, refinement
from polytask.archs.decoder._common import (
    KeepsIntermediate,
    check_outputs,
    fuse_scales,
    upsample_to,
)
from polytask.archs.registry import register

__all__ = ["PADNet"]


@register("pad_net")
class PADNet(KeepsIntermediate, MultiTaskModel):
    """PAD-Net: predict every task, distil the predictions' features, predict again.

    Xu, Ouyang, Wang & Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation
    Network for Simultaneous Depth Estimation and Scene Parsing", CVPR 2018. The user's
    backbone gives a feature map; each task (final and auxiliary) has an intermediate
    branch (two residual blocks to ``channels`` wide features ``F_t`` and a 1x1 conv giving
    the intermediate prediction); the multi-modal distillation module passes
    attention-gated messages between the tasks' features,
    ``F_t^o = F_t + Σ_{s≠t} σ(G_ts ⊛ F_t) ⊙ (W_ts ⊛ F_s)``; each final task's decoder (two
    residual blocks and a 1x1 conv) predicts from ``F_t^o``.

    The intermediate predictions are supervised too in the paper (deep supervision):
    after every forward :attr:`last_intermediate` holds ``{task: prediction}`` for the
    final and auxiliary tasks, and :meth:`forward_with_intermediate` returns both.

    Hyper-parameters (reference-code defaults):
        channels: width of the task features, 256 (Vandenhende et al. code).
        gate: ``"target"`` (the paper's attention-guided unit: the gate reads the receiving
            task's features) or ``"source"`` (the Vandenhende et al. code's self-attention
            on the sending task's features).
        auxiliary: ``{name: channels}`` of tasks that are only predicted at the intermediate
            stage (the paper uses depth, normals, contours and parsing as intermediate tasks
            for the depth and parsing outputs).
        upsample: resize the predictions to the input's spatial size (bilinear), as the
            reference code does.

    Departure: the residual blocks are basic blocks (the reference code uses bottlenecks,
    whose 4x channel expansion makes no sense at small widths).

    Args:
        tasks: the final task names (or their number K).
        backbone: module mapping the input to a feature map [B, C, h, w] (or a list of maps,
            which are resized to the first one's size and concatenated).
        backbone_channels: C (the total over the list).
        out_channels: output channels per final task (``{task: int}`` or one int for all).

    Parameters of a task: its distillation convs, its decoder and its intermediate 1x1 conv;
    the backbone and the intermediate feature branches reach every task.
    """

    paper = (
        "Xu, Ouyang, Wang & Sebe, PAD-Net: Multi-Tasks Guided Prediction-and-Distillation "
        "Network for Simultaneous Depth Estimation and Scene Parsing, CVPR 2018"
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
        gate: str = "target",
        upsample: bool = True,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        outputs, aux = check_outputs(self.tasks, out_channels, auxiliary)
        self.backbone = backbone
        self.upsample = upsample
        self.auxiliary = tuple(aux)
        every = {**outputs, **aux}
        self.features = nn.ModuleDict({t: refinement(backbone_channels, channels) for t in every})
        self.initial = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in every.items()})
        self.distillation = MultiModalDistillation(self.tasks, list(every), channels, gate)
        self.decoders = nn.ModuleDict(
            {
                t: nn.Sequential(refinement(channels, channels), nn.Conv2d(channels, c, 1))
                for t, c in outputs.items()
            }
        )
        self.last_intermediate: dict[str, Tensor] = {}

    def forward_with_intermediate(
        self, x: Any, task: str | None = None
    ) -> tuple[dict[str, Tensor] | Tensor, dict[str, Tensor]]:
        """``(forward(x, task), {task: intermediate prediction})``."""
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        z = self.backbone(x)
        if isinstance(z, (list, tuple)):
            z = fuse_scales(z)
        feats = {t: branch(z) for t, branch in self.features.items()}
        size = x.shape[2:] if self.upsample else None
        intermediate = {t: self._resize(self.initial[t](f), size) for t, f in feats.items()}
        distilled = self.distillation(feats, wanted)
        out = {t: self._resize(self.decoders[t](distilled[t]), size) for t in wanted}
        self.last_intermediate = intermediate
        return self._select(out, task), intermediate

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        return self.forward_with_intermediate(x, task)[0]

    @staticmethod
    def _resize(y: Tensor, size: Any) -> Tensor:
        return y if size is None else upsample_to(y, size)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield from self.decoders[task].parameters()
        yield from self.distillation.message[task].parameters()
        yield from self.distillation.attention[task].parameters()
        yield from self.initial[task].parameters()
