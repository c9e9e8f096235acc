"""The dense-prediction augmentation of the MTAN code: random scale-crop, then a random
horizontal flip (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019; ``RandomScaleCrop`` in lorenmt/mtan ``im2im_pred/create_dataset.py``, credited
there to Jialong Wu, issue #34; the same code is in LibMTL, CAGrad and Nash-MTL).

Scale-crop: a scale s is drawn from ``scales`` (1.0, 1.2, 1.5), a crop of
(int(H / s), int(W / s)) pixels at a uniformly drawn corner is resized back to (H, W): the
image and the normals bilinearly (``align_corners=True``), the labels and the depth with
nearest neighbours, and the depth is divided by s (an object seen s times larger is s times
nearer). Flip, with probability 1/2: every map is mirrored left-right and the normals' x
component changes sign. The normals are not re-normalised after the bilinear resize, as in
the official code (the loss and metrics normalise the prediction, and the target's norm only
scales the cosine near label borders).

Randomness comes from ``torch``'s global generator (or ``generator``), which the trainer and
``DataLoader`` workers seed, so an augmented run is reproducible; the official code draws the
scale and corner from Python's ``random`` and the flip from ``torch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MTAN_SCALES", "random_flip", "random_scale_crop"]

MTAN_SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (both included, as Python's ``random.randint``)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def random_scale_crop(
    image: Tensor,
    label: Tensor,
    depth: Tensor,
    normal: Tensor | None = None,
    *,
    scales: Sequence[float] = MTAN_SCALES,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Scale-crop ``image`` [3, H, W], ``label`` [H, W], ``depth`` [1, H, W] and ``normal``
    [3, H, W] (optional) as MTAN does; returns them at the same size."""
    height, width = image.shape[-2:]
    scale = float(scales[_randint(0, len(scales) - 1, generator)])
    h, w = int(height / scale), int(width / scale)
    i = _randint(0, height - h, generator)
    j = _randint(0, width - w, generator)
    size = (height, width)

    def crop(x: Tensor) -> Tensor:
        return x[..., i : i + h, j : j + w].unsqueeze(0)

    image = F.interpolate(crop(image), size=size, mode="bilinear", align_corners=True)[0]
    label_dtype = label.dtype
    label = F.interpolate(crop(label.float()[None]), size=size, mode="nearest")[0, 0]
    depth = F.interpolate(crop(depth), size=size, mode="nearest")[0] / scale
    if normal is not None:
        normal = F.interpolate(crop(normal), size=size, mode="bilinear", align_corners=True)[0]
    return image, label.to(label_dtype), depth, normal


def random_flip(
    image: Tensor,
    label: Tensor,
    depth: Tensor,
    normal: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """With probability 1/2, mirror every map left-right (the normals' x negated)."""
    if float(torch.rand(1, generator=generator)) >= 0.5:
        return image, label, depth, normal
    image, label, depth = image.flip(-1), label.flip(-1), depth.flip(-1)
    if normal is not None:
        normal = normal.flip(-1)
        normal = torch.cat([-normal[:1], normal[1:]], dim=0)
    return image, label, depth, normal
