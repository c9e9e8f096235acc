"""ResNet-18/34/50/101 (He et al., CVPR 2016) with torchvision's ``state_dict`` layout.

The modules are named exactly as in ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``, ...), so a torchvision checkpoint loads
with ``model.load_state_dict(torch.load(path))`` (``strict=False`` without ``fc``), although
torchvision itself is not needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.archs.backbones._registry import register_backbone

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101"]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size of a stride-1 3x3 convolution.
    return nn.Conv2d(
        inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut: ResNet-18/34.

    Args:
        inplanes, planes: input and output channels.
        stride: stride of the first convolution.
        downsample: the projection shortcut (``None``: identity).
        dilation: dilation of the block's 3x3 convolutions.
        first_dilation: dilation of its first 3x3 convolution (default ``dilation``); in the
            first block of a dilated stage it keeps the previous stage's dilation, as in the
            dilated ResNets of DeepLab and of the MTAN/LibMTL code.
        norm_layer: normalisation module factory (default ``nn.BatchNorm2d``).
    """

    expansion: ClassVar[int] = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        first = dilation if first_dilation is None else first_dilation
        self.conv1 = _conv3x3(inplanes, planes, stride, first)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck block with 4x expansion: ResNet-50/101.

    The stride sits on the 3x3 convolution ("ResNet v1.5", torchvision's choice), not on the
    first 1x1 as in the paper's Caffe models; the parameter count is the same.

    Args: as :class:`BasicBlock`; ``first_dilation`` (default ``dilation``) is the dilation of
    the single 3x3 convolution in the first block of a stage, ``dilation`` its dilation in the
    other blocks, which is torchvision's rule.
    """

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        first = dilation if first_dilation is None else first_dilation
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Deep residual network (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
    Recognition", CVPR 2016), as a backbone for single- and multi-task models.

    Stem (7x7/2 convolution, BN, ReLU, 3x3/2 max-pool) then four stages of residual blocks
    with 64, 128, 256, 512 base channels (times the block's expansion), strides 1, 2, 2, 2:
    output stride 32. For dense prediction, ``replace_stride_with_dilation`` replaces the
    stride of stage 2, 3 or 4 by a dilation (Yu & Koltun 2016; Chen et al., DeepLab, TPAMI
    2018), as in torchvision: ``[False, True, True]`` gives output stride 8 (the dilated
    ResNet-50 of the MTAN and LibMTL NYUv2/Cityscapes code), ``[False, False, True]``
    output stride 16. In a dilated stage the first block's strided 3x3 convolution keeps the
    previous dilation and every later 3x3 convolution gets the new one.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        num_classes: size of the final linear classifier ``fc``; ``None`` (the default, since
            this is a backbone) has no ``avgpool``/``fc`` head.
        global_pool: without a classifier, return the globally average-pooled features
            ``[B, C]`` instead of the feature map ``[B, C, H/s, W/s]`` (implied with a
            classifier).
        in_channels: image channels (3).
        replace_stride_with_dilation: three booleans for stages 2, 3, 4 (default none).
        zero_init_residual: initialise each block's last BN scale to zero (Goyal et al. 2017),
            as torchvision's option of the same name (off by default).
        norm_layer: normalisation module factory (default ``nn.BatchNorm2d``).

    Initialisation as torchvision: He-normal (fan-out) convolutions, BN weight 1 and bias 0,
    PyTorch's default for ``fc``.

    ``forward(x)`` returns the logits, the pooled features or the last feature map (see
    above); ``forward(x, return_stages=True)`` returns the list of the five stage outputs
    (stem, layer1..layer4) that multi-stage architectures such as MTAN read, and
    :meth:`stages` the five stage modules, to be given to architectures that take a list of
    stages (``hard_sharing`` with a split point, ``hierarchical``).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int | None = None,
        global_pool: bool = False,
        in_channels: int = 3,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        layers = list(layers)
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers={layers} must be four positive block counts")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        dilate = list(replace_stride_with_dilation)
        if len(dilate) != 3 or any(not isinstance(d, bool) for d in dilate):
            raise ValueError(
                f"replace_stride_with_dilation={replace_stride_with_dilation!r} must be three "
                "booleans, for stages 2, 3 and 4 (e.g. [False, True, True] for output stride 8)"
            )
        self._norm = norm_layer or nn.BatchNorm2d
        self._block = block
        self.num_classes = num_classes
        self.global_pool = global_pool or num_classes is not None
        self.inplanes = 64
        self.dilation = 1

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_channels = 512 * block.expansion
        self.stage_channels = [64] + [c * block.expansion for c in (64, 128, 256, 512)]
        self.output_stride = 32 // 2 ** sum(dilate)
        self.fc = nn.Linear(self.out_channels, num_classes) if num_classes is not None else None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Each residual branch then starts as zero and each block as the identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                    if getattr(last, "weight", None) is not None:
                        nn.init.zeros_(last.weight)

    def _make_layer(
        self, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        expansion = self._block.expansion
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * expansion, stride), self._norm(planes * expansion)
            )
        layers = [
            self._block(
                self.inplanes,
                planes,
                stride,
                downsample,
                dilation=self.dilation,
                first_dilation=previous_dilation,
                norm_layer=self._norm,
            )
        ]
        self.inplanes = planes * expansion
        for _ in range(1, blocks):
            layers.append(
                self._block(self.inplanes, planes, dilation=self.dilation, norm_layer=self._norm)
            )
        return nn.Sequential(*layers)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        """The five stages ``[stem, layer1, layer2, layer3, layer4]`` as modules (the stem is a
        new ``nn.Sequential`` holding this network's own ``conv1``, ``bn1``, ``relu`` and
        ``maxpool``, not copies); the pooling/classifier head is not included."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor, return_stages: bool = False) -> Tensor | list[Tensor]:
        outputs = [self.stem(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            outputs.append(layer(outputs[-1]))
        if return_stages:
            return outputs
        features = outputs[-1]
        if not self.global_pool:
            return features
        pooled = torch.flatten(self.avgpool(features), 1)
        return pooled if self.fc is None else self.fc(pooled)


@register_backbone("resnet18")
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2] (11,176,512 parameters; 11,689,512 with the
    1000-class ``fc``). Keyword arguments as :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_backbone("resnet34")
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]. Keyword arguments as :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_backbone("resnet50")
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3] (23,508,032 parameters; 25,557,032 with the
    1000-class ``fc``). Keyword arguments as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_backbone("resnet101")
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3]. Keyword arguments as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)
