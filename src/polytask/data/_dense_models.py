"""The two standard networks of the NYUv2 and Cityscapes benchmarks, as hard-sharing models.

* ``"deeplab"``: a dilated ResNet-50 (output stride 8) shared by all tasks, and one
  DeepLab-v3 ASPP head per task (Chen et al., "Rethinking Atrous Convolution for Semantic
  Image Segmentation", arXiv:1706.05587, 2017): the network of LibMTL's ``examples/nyu`` and
  ``examples/cityscapes`` (``resnet_dilated('resnet50')`` + ``aspp.DeepLabHead(2048, C)``,
  rates 12, 24, 36, 256 channels, dropout 0.5), whose outputs are bilinearly upsampled
  (``align_corners=True``) to the image size.
* ``"segnet"``: MTAN's SegNet shared by all tasks with a 3x3 and a 1x1 convolution per task
  ("Split" in Liu, Johns & Davison, CVPR 2019; ``model_segnet_split.py`` in lorenmt/mtan and
  CAGrad), the network of the CAGrad, Nash-MTL and FAMO experiments.

Departure: LibMTL's ResNet-50 starts from ImageNet weights; there is no download here, so
the backbone starts from random weights unless ``weights=`` names a torchvision ResNet
checkpoint file (``resnet50-0676ba61.pth`` or any ``state_dict`` with torchvision's names).
The normals head outputs an unnormalised vector: the loss and the metrics normalise it (the
MTAN code normalises inside the network; the direction, and so every metric, is the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "DeepLabHead", "SegNetHead", "dense_model"]

ARCHS = ("deeplab", "segnet")


class _ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = super().forward(x)
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab-v3): a 1x1 branch, three dilated 3x3 branches
    and an image-pooling branch, concatenated and projected to ``width`` channels, then
    dropout 0.5."""

    def __init__(
        self, in_channels: int, rates: Sequence[int] = (12, 24, 36), width: int = 256
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, width, 1)]
        branches += [_conv_bn_relu(in_channels, width, 3, rate) for rate in rates]
        branches.append(_ASPPPooling(in_channels, width))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * width, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, a 3x3 conv-BN-ReLU and a 1x1 classifier to ``out_channels``, then bilinear
    upsampling by ``upsample`` (the backbone's output stride) back to the image size.
    Parameter names are those of LibMTL's (and torchvision's) ``DeepLabHead``, so their
    checkpoints load."""

    def __init__(
        self, in_channels: int, out_channels: int, *, upsample: int = 8, width: int = 256
    ) -> None:
        super().__init__(
            ASPP(in_channels, width=width),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 1),
        )
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        size = (x.shape[-2] * self.upsample, x.shape[-1] * self.upsample)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


class SegNetHead(nn.Sequential):
    """MTAN's "split" task head: a 3x3 convolution then a 1x1 convolution to
    ``out_channels`` (no normalisation or activation between them, as in the MTAN code)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            nn.Conv2d(in_channels, out_channels, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)


def dense_model(
    arch: str,
    task_names: Sequence[str],
    out_channels: Mapping[str, int],
    *,
    backbone: str = "resnet50",
    width: int = 256,
    filters: Sequence[int] = (64, 128, 256, 512, 512),
    weights: str | Path | None = None,
) -> nn.Module:
    """A hard-sharing model for dense prediction (see the module docstring).

    Args:
        arch: ``"deeplab"`` or ``"segnet"``.
        task_names: the tasks to predict (a single one: the single-task network).
        out_channels: output channels per task name.
        backbone: for ``"deeplab"``, a ResNet of :mod:`polytask.archs.backbones`
            (``"resnet50"``; a smaller one for quick runs and tests), dilated to stride 8.
        width: the ASPP heads' channels (256).
        filters: for ``"segnet"``, the SegNet channels per block (MTAN's default).
        weights: a torchvision-layout ResNet ``state_dict`` file for the backbone.
    """
    from polytask import archs
    from polytask.archs import backbones

    names = list(task_names)
    unknown = [t for t in names if t not in out_channels]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(out_channels)}")
    if arch == "deeplab":
        if not backbone.startswith("resnet"):
            raise ValueError(f"backbone={backbone!r} must be a ResNet (resnet18 ... resnet101)")
        encoder = backbones.create(backbone, replace_stride_with_dilation=[False, True, True])
        if weights is not None:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            encoder.load_state_dict(state)
        heads = {
            t: DeepLabHead(
                encoder.out_channels, out_channels[t], upsample=encoder.output_stride, width=width
            )
            for t in names
        }
    elif arch == "segnet":
        if weights is not None:
            raise ValueError("weights= is for the ResNet of arch='deeplab'; SegNet has none")
        encoder = backbones.create("segnet", filters=tuple(filters))
        heads = {t: SegNetHead(encoder.out_channels, out_channels[t]) for t in names}
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHS)}")
    return archs.create("hard_sharing", tasks=names, encoder=encoder, heads=heads)
