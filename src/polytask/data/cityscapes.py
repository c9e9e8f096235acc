"""Cityscapes with 7- (or 19-) class segmentation and depth, in MTAN's preprocessed form.

The data: Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding",
CVPR 2016; 2,975 training and 500 validation images of street scenes. The multi-task
version: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention" (MTAN), CVPR
2019: images resized to 128 x 256, the 7 coarse categories (or the 19 evaluation classes),
depth from the disparity maps. Layout and item format: :mod:`polytask.data._npy_scenes`:
``root/{train,val}/{image,<labels>,depth}/<i>.npy`` with labels in ``label_7`` or
``label_19`` (MTAN's download) or ``label`` (LibMTL's "cityscapes2" copy, 7 classes).

Splits, as for :mod:`polytask.data.nyuv2`: ``test`` is ``root/val`` (the official
validation images, which the papers report on), ``val`` a random ``val_fraction`` (default
10%, 298 images) of ``root/train`` drawn with ``data_seed``; ``val_fraction=0`` gives the
papers' protocol (``val`` is the test set).

Benchmarks:

* ``cityscapes``: LibMTL's recipe (Lin & Zhang, JMLR 2023; ``examples/cityscapes/main.py``,
  ``LibMTL/config.py``): DeepLab-v3 heads on a dilated ResNet-50, Adam lr 1e-4, weight decay
  1e-5, batch size 64, 200 epochs, halved every 100, no augmentation.
* ``cityscapes_segnet``: CAGrad's (Liu et al., NeurIPS 2021; ``cityscapes/model_segnet_*.py``
  and ``run.sh`` of Cranial-XIX/CAGrad), also Nash-MTL's and FAMO's: MTAN's SegNet, Adam lr
  1e-4, batch size 8, 200 epochs, halved after 100, with MTAN's augmentation.

Get the data from the MTAN project page (https://github.com/lorenmt/mtan, the preprocessed
Cityscapes linked there) and unpack it so that ``<root>/train/image/0.npy`` exists.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from polytask.data._dense_models import dense_model
from polytask.data._files import check_flag, check_root, holdout
from polytask.data._npy_scenes import NpyScenes, scene_count
from polytask.data.benchmark import Benchmark, Recipe, options_of, register
from polytask.errors import DataNotFoundError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["SIZE", "SOURCE", "TASKS", "label_field", "load_cityscapes", "model", "tasks"]

SIZE = (128, 256)
TASKS = ("segmentation", "depth")
SOURCE = (
    "Get MTAN's preprocessed Cityscapes (Liu, Johns & Davison, CVPR 2019) from the download "
    "linked on the MTAN project page https://github.com/lorenmt/mtan (section 'Datasets'), "
    "and unpack it so that <root>/train/image/0.npy and <root>/val/image/0.npy exist."
)
_NAME = "Cityscapes"


def label_field(split_folder: Path, num_classes: int) -> str:
    """The labels' folder: ``label_<num_classes>`` (MTAN), else ``label`` for 7 classes
    (LibMTL's copy)."""
    if num_classes not in (7, 19):
        raise ValueError(f"num_classes={num_classes!r} must be 7 or 19 (MTAN's label sets)")
    if (split_folder / f"label_{num_classes}").is_dir():
        return f"label_{num_classes}"
    if num_classes == 7 and (split_folder / "label").is_dir():
        return "label"
    alternatives = " (or label/ for 7 classes)" if num_classes == 7 else ""
    raise DataNotFoundError(
        f"{_NAME}: the folder {split_folder / f'label_{num_classes}'} is missing"
        f"{alternatives}. {SOURCE}"
    )


def load_cityscapes(
    root: str | Path | None,
    *,
    num_classes: int = 7,
    val_fraction: float = 0.1,
    augment: bool = False,
    data_seed: int = 0,
) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` splits of MTAN's Cityscapes under ``root`` (see the
    module docstring); ``augment`` applies MTAN's augmentation to ``train`` only."""
    check_flag("augment", augment)
    base = check_root(root, _NAME, SOURCE)
    fields = {}
    counts = {}
    for folder in ("train", "val"):
        fields[folder] = label_field(base / folder, num_classes)
        counts[folder] = scene_count(
            base / folder, ("image", fields[folder], "depth"), _NAME, SOURCE
        )
    split = functools.partial(
        NpyScenes, size=SIZE, num_classes=num_classes, normals=False, name=_NAME
    )
    test = split(base / "val", label_field=fields["val"], indices=range(counts["val"]))
    train_split = functools.partial(split, base / "train", label_field=fields["train"])
    if val_fraction == 0:
        train = train_split(indices=range(counts["train"]), augment=augment)
        return {"train": train, "val": test, "test": test}
    kept, held = holdout(counts["train"], val_fraction, data_seed)
    return {
        "train": train_split(indices=kept, augment=augment),
        "val": train_split(indices=held),
        "test": test,
    }


def tasks(num_classes: int = 7) -> TaskSet:
    """Segmentation (cross-entropy; mIoU, pixel accuracy) and depth (L1 over measured
    pixels; absolute and relative error), as in MTAN."""
    return TaskSet(
        [
            Task(
                "segmentation",
                losses.cross_entropy,
                [functools.partial(metrics.Segmentation, num_classes)],
            ),
            Task("depth", losses.depth_l1, [metrics.Depth], label_kind="depth"),
        ]
    )


def model(
    arch: str, task_names: Sequence[str], *, num_classes: int = 7, **options: Any
) -> nn.Module:
    """The benchmark's network (``"deeplab"`` or ``"segnet"``); options (``backbone``,
    ``width``, ``filters``, ``weights``) as :func:`polytask.data._dense_models.dense_model`."""
    return dense_model(arch, task_names, {"segmentation": num_classes, "depth": 1}, **options)


def _check_options(options: dict[str, Any]) -> None:
    if options.get("num_classes", 7) != 7:
        raise ValueError(
            "the cityscapes benchmarks are the 7-class setting of MTAN; for 19 classes use "
            "load_cityscapes(root, num_classes=19) with tasks(19) and model(..., num_classes=19)"
        )


def _load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
    del seed  # the split depends on data_seed only
    _check_options(options)
    return load_cityscapes(root, **options)


def _load_augmented(seed: int = 0, root: str | None = None, **options: Any):
    del seed
    _check_options(options)
    options.setdefault("augment", True)
    return load_cityscapes(root, **options)


_SUMMARY = "Cityscapes (MTAN preprocessed, 128x256): 7-class segmentation, depth"

BENCHMARK = register(
    Benchmark(
        name="cityscapes",
        summary=f"{_SUMMARY}; LibMTL's DeepLab-ResNet-50 recipe",
        source=(
            "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019 "
            "(data); Lin & Zhang, LibMTL, JMLR 2023, examples/cityscapes (network and recipe)"
        ),
        tasks=tasks,
        load=_load,
        options=options_of(load_cityscapes),
        model=model,
        archs=("deeplab", "segnet"),
        recipe=Recipe(
            epochs=200,
            batch_size=64,
            eval_batch_size=64,
            optimizer="adam",
            lr=1e-4,
            weight_decay=1e-5,
            scheduler="step",
            step_size=100,
            gamma=0.5,
        ),
        needs_root=True,
    )
)

BENCHMARK_SEGNET = register(
    Benchmark(
        name="cityscapes_segnet",
        summary=f"{_SUMMARY}; CAGrad's SegNet recipe, with augmentation",
        source=(
            "Liu, Johns & Davison, CVPR 2019 (data, SegNet); Liu et al., Conflict-Averse "
            "Gradient Descent, NeurIPS 2021, cityscapes scripts (recipe)"
        ),
        tasks=tasks,
        load=_load_augmented,
        options=options_of(load_cityscapes),
        model=model,
        archs=("segnet",),
        recipe=Recipe(
            epochs=200,
            batch_size=8,
            eval_batch_size=8,
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.0,
            scheduler="step",
            step_size=100,
            gamma=0.5,
        ),
        needs_root=True,
    )
)
