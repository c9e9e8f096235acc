"""Image files to tensors with Pillow, as torchvision's ``Resize`` + ``ToTensor`` (+
``Normalize``) do, without torchvision.

torchvision resizes a PIL image with ``image.resize((W, H), BILINEAR)`` (Pillow's resampling,
which widens its filter when shrinking, i.e. anti-aliases), then ``ToTensor`` scales the
bytes to [0, 1] channels first; we do the same calls. Pillow is imported on first use: it
comes with matplotlib, a polytask dependency, but a missing copy is reported with the command
that installs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polytask.errors import DataFormatError, DataNotFoundError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "read_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError(
            "reading image files needs Pillow: pip install pillow (it is a dependency of "
            "matplotlib, which polytask requires)"
        ) from None
    return Image


def read_image(
    path: Path,
    size: tuple[int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "image",
    source: str = "",
) -> Tensor:
    """The RGB image at ``path`` as float32 [3, H, W] in [0, 1], bilinearly resized to
    ``size`` = (H, W), then normalised per channel when ``mean`` and ``std`` are given."""
    image_module = _pil()
    if not path.is_file():
        raise DataNotFoundError(f"{name}: the image {path} is missing. {source}".rstrip())
    try:
        with image_module.open(path) as img:
            rgb = img.convert("RGB").resize((size[1], size[0]), image_module.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except OSError as exc:
        raise DataFormatError(f"{name}: cannot decode {path} as an image ({exc})") from None
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor - m) / s
    return tensor
