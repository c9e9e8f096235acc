"""CelebA: 40 binary face attributes, one task each, on the aligned and cropped images.

The data: Liu, Luo, Wang & Tang, "Deep Learning Face Attributes in the Wild", ICCV 2015;
202,599 face images (``img_align_celeba/*.jpg``, 178 x 218), 40 attributes per image
(``list_attr_celeba.txt``, values -1 / 1) and the standard partition
(``list_eval_partition.txt``: 0 train, 1 validation, 2 test; 162,770 / 19,867 / 19,962).
As a 40-task MTL problem: Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018, and the setting of FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast
Adaptive Multitask Optimization", NeurIPS 2023), whose code (Cranial-XIX/FAMO,
``experiments/celeba``) gives the recipe encoded here:

* images resized to 64 x 64 (bilinear, no normalisation; ``transforms.Resize((64, 64))`` +
  ``ToTensor``);
* a 9-layer CNN shared by all tasks (:class:`CelebaCNN`) and one linear output per attribute;
* binary cross-entropy per attribute; F1 score per attribute (FAMO reports F1);
* Adam, lr 3e-4, batch size 256, 15 epochs, no schedule, no weight decay;
* the official partition: ``train``, ``val`` and ``test`` are partitions 0, 1 and 2.

An item is ``(image [3, 64, 64] float32, {attribute: 0-d float32 tensor in {0, 1}})``; the
tasks are named by the attributes (``5_o_Clock_Shadow``, ..., ``Young``) in the file's order.

Layout: the files may sit directly under ``root`` (``root/list_attr_celeba.txt``,
``root/list_eval_partition.txt``, ``root/img_align_celeba/``, as torchvision's
``root/celeba`` folder) or in the official release's folders (``root/Anno/``, ``root/Eval/``,
``root/Img/img_align_celeba/``). Get them from the CelebA project page
(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: "Align&Cropped Images",
``img_align_celeba.zip``; "Attributes Annotations"; "Evaluation Partitions").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polytask.data._files import check_root
from polytask.data._images import read_image
from polytask.data.benchmark import Benchmark, Recipe, options_of, register
from polytask.errors import DataFormatError, DataNotFoundError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = [
    "ATTRIBUTES",
    "SOURCE",
    "CelebA",
    "CelebaCNN",
    "celeba_files",
    "load_celeba",
    "model",
    "read_attributes",
    "read_partition",
    "tasks",
]

#: The 40 attributes, in the order of ``list_attr_celeba.txt``.
ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
SIZE = (64, 64)
SPLITS = {"train": 0, "val": 1, "test": 2}
SOURCE = (
    "Get CelebA from its project page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
    "(Align&Cropped Images: img_align_celeba.zip; Anno/list_attr_celeba.txt; "
    "Eval/list_eval_partition.txt) and put them under the root, either flat "
    "(<root>/list_attr_celeba.txt, <root>/list_eval_partition.txt, <root>/img_align_celeba/) "
    "or in the release's folders (<root>/Anno/, <root>/Eval/, <root>/Img/img_align_celeba/)."
)
_NAME = "CelebA"
_FILES = {
    "attributes": ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt"),
    "partition": ("list_eval_partition.txt", "Eval/list_eval_partition.txt"),
    "images": ("img_align_celeba", "Img/img_align_celeba"),
}


def celeba_files(root: str | Path | None) -> dict[str, Path]:
    """The attribute file, the partition file and the image folder under ``root`` (either
    layout); the first one missing is named with both places it may be."""
    base = check_root(root, _NAME, SOURCE)
    out = {}
    for key, candidates in _FILES.items():
        found = [base / c for c in candidates if (base / c).exists()]
        if not found:
            places = " or ".join(str(base / c) for c in candidates)
            raise DataNotFoundError(f"{_NAME}: {places} is missing. {SOURCE}")
        out[key] = found[0]
    return out


def read_attributes(path: Path) -> tuple[list[str], Tensor]:
    """File names and the [N, 40] attribute matrix (float32, -1 / 1 mapped to 0 / 1) of a
    ``list_attr_celeba.txt``: a count line, the 40 names, then one row per image."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataFormatError(
            f"{path}: the first line must be the number of images, got {lines[:1]!r}"
        )
    count = int(lines[0])
    names = tuple(lines[1].split())
    if names != ATTRIBUTES:
        raise DataFormatError(
            f"{path}: line 2 must list CelebA's 40 attributes in order; got {len(names)} "
            f"names starting {names[:3]}"
        )
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise DataFormatError(f"{path}: the first line announces {count} rows, found {len(rows)}")
    files, values = [], []
    for number, row in enumerate(rows, 3):
        if len(row) != 41 or any(v not in ("1", "-1") for v in row[1:]):
            raise DataFormatError(
                f"{path}, line {number}: expected a file name and 40 values in {{-1, 1}}, got "
                f"{' '.join(row)[:80]!r}"
            )
        files.append(row[0])
        values.append([v == "1" for v in row[1:]])
    return files, torch.tensor(values, dtype=torch.float32)


def read_partition(path: Path) -> dict[str, int]:
    """File name -> partition (0 train, 1 validation, 2 test) of ``list_eval_partition.txt``."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataFormatError(
                    f"{path}, line {number}: expected '<file> <0|1|2>', got {line.strip()!r}"
                )
            out[fields[0]] = int(fields[1])
    return out


class CelebA(Dataset):
    """One split of CelebA: items ``(image [3, H, W], {attribute: 0-d float32 in {0, 1}})``."""

    def __init__(
        self, images: Path, files: Sequence[str], labels: Tensor, size: tuple[int, int] = SIZE
    ) -> None:
        self.images, self.files, self.labels, self.size = images, list(files), labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = read_image(self.images / self.files[i], self.size, name=_NAME, source=SOURCE)
        row = self.labels[i]
        return image, {a: row[k] for k, a in enumerate(ATTRIBUTES)}


def load_celeba(
    root: str | Path | None, *, image_size: tuple[int, int] = SIZE
) -> dict[str, Dataset]:
    """``{"train", "val", "test"}``: CelebA's official partition under ``root``."""
    paths = celeba_files(root)
    files, labels = read_attributes(paths["attributes"])
    partition = read_partition(paths["partition"])
    unknown = [f for f in files if f not in partition]
    if unknown:
        raise DataFormatError(
            f"{paths['partition']} has no partition for {len(unknown)} image(s) of "
            f"{paths['attributes']}, e.g. {unknown[0]}"
        )
    if not paths["images"].is_dir():
        raise DataNotFoundError(f"{_NAME}: {paths['images']} is not a folder. {SOURCE}")
    size = (int(image_size[0]), int(image_size[1]))
    out: dict[str, Dataset] = {}
    for split, code in SPLITS.items():
        rows = [k for k, f in enumerate(files) if partition[f] == code]
        if not rows:
            raise DataFormatError(f"{paths['partition']} lists no image in partition {code}")
        # The first image of each split is checked now, so a missing folder content is
        # reported at load time rather than in the first batch.
        first = paths["images"] / files[rows[0]]
        if not first.is_file():
            raise DataNotFoundError(f"{_NAME}: the image {first} is missing. {SOURCE}")
        index = torch.tensor(rows)
        out[split] = CelebA(paths["images"], [files[k] for k in rows], labels[index], size)
    return out


def tasks() -> TaskSet:
    """One task per attribute: binary cross-entropy on a logit, F1 score (as FAMO)."""
    return TaskSet([Task(a, losses.bce_with_logits, [metrics.F1]) for a in ATTRIBUTES])


class CelebaCNN(nn.Sequential):
    """FAMO's shared CelebA network (``experiments/celeba/models.py``): 3x3 conv-BN-ReLU
    layers of w, 2w, 2w, 4w, 4w, 8w, 8w channels with 2x2 max-pooling after the 1st, 3rd and
    5th, global average pooling, then two bias-free linear-BN-ReLU layers of 8w units
    (w = 64: 512 features). ``width`` = w (smaller for tests)."""

    def __init__(self, width: int = 64) -> None:
        w = int(width)
        if w < 1:
            raise ValueError(f"width={width!r} must be a positive int")
        channels = [w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w]
        layers: list[nn.Module] = []
        previous = 3
        for k, c in enumerate(channels):
            layers += [nn.Conv2d(previous, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
            layers.append(nn.ReLU(inplace=True))
            if k in (0, 2, 4):
                layers.append(nn.MaxPool2d(2, stride=2))
            previous = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        for _ in range(2):
            layers += [nn.Linear(previous, previous, bias=False), nn.BatchNorm1d(previous)]
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.out_features = previous


def model(arch: str, task_names: Sequence[str], *, width: int = 64, **options: Any) -> nn.Module:
    """``"cnn"``: :class:`CelebaCNN` shared, one ``Linear(8 width, 1)`` logit per task."""
    from polytask import archs

    if options:
        raise TypeError(f"unknown CelebA model option(s) {sorted(options)}; it accepts width")
    if arch != "cnn":
        raise ValueError(f"unknown architecture {arch!r} for celeba; it has ['cnn']")
    names = list(task_names)
    unknown = [t for t in names if t not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown CelebA attribute(s) {unknown}")
    encoder = CelebaCNN(width)
    heads = {t: nn.Linear(encoder.out_features, 1) for t in names}
    return archs.create("hard_sharing", tasks=names, encoder=encoder, heads=heads)


def _load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
    del seed  # the official partition: the same for every seed
    return load_celeba(root, **options)


BENCHMARK = register(
    Benchmark(
        name="celeba",
        summary="CelebA: 40 binary face attributes (64x64 aligned faces), FAMO's recipe",
        source=(
            "Liu et al., Deep Learning Face Attributes in the Wild, ICCV 2015 (data); Sener & "
            "Koltun, NeurIPS 2018 (as MTL); Liu et al., FAMO, NeurIPS 2023 (network, recipe)"
        ),
        tasks=tasks,
        load=_load,
        options=options_of(load_celeba),
        model=model,
        archs=("cnn",),
        recipe=Recipe(epochs=15, batch_size=256, optimizer="adam", lr=3e-4, weight_decay=0.0),
        needs_root=True,
    )
)
