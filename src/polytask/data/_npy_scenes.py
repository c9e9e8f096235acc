"""The preprocessed ``.npy`` layout of MTAN's NYUv2 and Cityscapes, read as torch Datasets.

Layout (lorenmt/mtan ``im2im_pred/create_dataset.py``; LibMTL ``examples/nyu`` and
``examples/cityscapes``): ``root/{train,val}/<field>/<i>.npy`` for i = 0 .. n-1, one array
per sample and field, stored height x width x channels:

* ``image``: [H, W, 3] float, RGB in [0, 1];
* the semantic labels (``label``, or ``label_7`` / ``label_19`` for MTAN's Cityscapes):
  [H, W], class indices stored as floats, -1 where unlabelled;
* ``depth``: [H, W, 1] float, 0 where not measured;
* ``normal`` (NYUv2 only): [H, W, 3] float, unit vectors, the zero vector where unlabelled.

An item is ``(image [3, H, W] float32, {"segmentation": [H, W] int64, "depth": [1, H, W]
float32, "normal": [3, H, W] float32})``: channels first as the MTAN loaders return them,
labels as integers with -1 kept as the ignore index of :mod:`polytask.tasks.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polytask.data._augment import random_flip, random_scale_crop
from polytask.data._files import npy_count, read_npy
from polytask.errors import DataFormatError, DataNotFoundError

__all__ = ["NpyScenes", "scene_count"]


def scene_count(folder: Path, fields: Sequence[str], name: str, source: str) -> int:
    """The number of samples in ``folder`` (a split), which every field must hold."""
    counts = {f: npy_count(folder / f, name, source) for f in fields}
    if len(set(counts.values())) != 1:
        raise DataNotFoundError(
            f"{name}: the fields of {folder} hold different numbers of samples {counts}; "
            f"some files are missing. {source}"
        )
    return next(iter(counts.values()))


class NpyScenes(Dataset):
    """One split of a MTAN-preprocessed scene data set (see the module docstring).

    Args:
        folder: the split's folder (``root/train`` or ``root/val``).
        size: (H, W) every array must have.
        num_classes: labels must be integers in [-1, num_classes).
        label_field: the folder of the semantic labels.
        normals: whether the data set has a ``normal`` field (NYUv2).
        indices: the sample numbers this split holds (a hold-out subset of ``folder``).
        augment: MTAN's random scale-crop and flip (:mod:`polytask.data._augment`).
        name: the data set's name, for error messages.
    """

    def __init__(
        self,
        folder: Path,
        *,
        size: tuple[int, int],
        num_classes: int,
        label_field: str,
        normals: bool,
        indices: Sequence[int] | np.ndarray,
        augment: bool = False,
        name: str,
    ) -> None:
        self.folder = folder
        self.size = size
        self.num_classes = num_classes
        self.label_field = label_field
        self.normals = normals
        self.indices = [int(i) for i in indices]
        self.augment = augment
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, field: str, index: int, channels: int | None) -> Tensor:
        h, w = self.size
        shape = (h, w) if channels is None else (h, w, channels)
        array = read_npy(self.folder / field / f"{index}.npy", shape, self.name)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return tensor if channels is None else tensor.permute(2, 0, 1).contiguous()

    def _labels(self, raw: Tensor, index: int) -> Tensor:
        if not bool(torch.all(raw == raw.round())):
            raise DataFormatError(
                f"{self.name}: {self.folder / self.label_field / f'{index}.npy'} holds "
                "non-integer class labels"
            )
        low, high = int(raw.min()), int(raw.max())
        if low < -1 or high >= self.num_classes:
            raise DataFormatError(
                f"{self.name}: {self.folder / self.label_field / f'{index}.npy'} has labels "
                f"in [{low}, {high}]; expected -1 (unlabelled) or 0 .. {self.num_classes - 1}"
            )
        return raw.long()

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        index = self.indices[i]
        image = self._read("image", index, 3)
        label = self._labels(self._read(self.label_field, index, None), index)
        depth = self._read("depth", index, 1)
        normal = self._read("normal", index, 3) if self.normals else None
        if self.augment:
            image, label, depth, normal = random_scale_crop(image, label, depth, normal)
            image, label, depth, normal = random_flip(image, label, depth, normal)
        targets = {"segmentation": label, "depth": depth}
        if normal is not None:
            targets["normal"] = normal
        return image, targets
