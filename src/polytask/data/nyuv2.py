"""NYUv2 with 13-class segmentation, depth and surface normals, in MTAN's preprocessed form.

The data: Silberman, Hoiem, Kohli & Fergus, "Indoor Segmentation and Support Inference
from RGBD Images", ECCV 2012; 795 training and 654 test images of indoor scenes. The
multi-task version: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention"
(MTAN), CVPR 2019, whose preprocessed copy (images resized to 288 x 384, the 13 classes of
Couprie et al. 2013, depth in metres, normals of Eigen & Fergus 2015) every MTL paper since
uses (LibMTL, CAGrad, Nash-MTL, FAMO, ...). Layout and item format:
:mod:`polytask.data._npy_scenes` (``root/{train,val}/{image,label,depth,normal}/<i>.npy``).

Splits. The official protocol has two: ``root/train`` (795) and ``root/val`` (654), and the
papers report the test images' scores at the last (or best) epoch: there is no validation
set. Here ``test`` is ``root/val`` and ``val`` is a random ``val_fraction`` (default 10%,
80 images) of ``root/train``, drawn with ``data_seed`` (the same for every training seed), so
model selection never sees the test images; ``val_fraction=0`` trains on all 795 and then
``val`` is the test set (the papers' protocol, for comparison with their tables).

Benchmarks (their recipes in the ``Recipe`` s below):

* ``nyuv2``: LibMTL's (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning",
  JMLR 2023; ``examples/nyu/main.py`` and ``LibMTL/config.py``): DeepLab-v3 heads on a
  dilated ResNet-50 (:mod:`polytask.data._dense_models`), Adam lr 1e-4, weight decay 1e-5,
  batch size 8, 200 epochs, step schedule halving the rate every 100 epochs, no
  augmentation (``--aug`` is off by default there).
* ``nyuv2_segnet``: CAGrad's and Nash-MTL's (Liu et al., NeurIPS 2021, ``nyuv2`` scripts of
  Cranial-XIX/CAGrad; Navon et al., ICML 2022, ``experiments/nyuv2/trainer.py``): MTAN's
  SegNet with split heads, Adam lr 1e-4 (no weight decay), batch size 2, 200 epochs, halved
  after 100, with MTAN's augmentation (random scale-crop and flip) on.

Get the data from the MTAN project page (https://github.com/lorenmt/mtan, "NYUv2", the
preprocessed download linked there; LibMTL and Nash-MTL link the same files) and unpack it so
that ``<root>/train/image/0.npy`` exists.
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
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["NUM_CLASSES", "SIZE", "SOURCE", "TASKS", "load_nyuv2", "model", "tasks"]

NUM_CLASSES = 13
SIZE = (288, 384)
TASKS = ("segmentation", "depth", "normal")
OUT_CHANNELS = {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}
FIELDS = ("image", "label", "depth", "normal")
SOURCE = (
    "Get MTAN's preprocessed NYUv2 (Liu, Johns & Davison, CVPR 2019) from the download "
    "linked on the MTAN project page https://github.com/lorenmt/mtan (section 'Datasets'), "
    "and unpack it so that <root>/train/image/0.npy and <root>/val/image/0.npy exist."
)
_NAME = "NYUv2"


def load_nyuv2(
    root: str | Path | None,
    *,
    val_fraction: float = 0.1,
    augment: bool = False,
    data_seed: int = 0,
) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` splits of MTAN's NYUv2 under ``root`` (see the module
    docstring); ``augment`` applies MTAN's augmentation to ``train`` only."""
    check_flag("augment", augment)
    base = check_root(root, _NAME, SOURCE)
    n_train = scene_count(base / "train", FIELDS, _NAME, SOURCE)
    n_test = scene_count(base / "val", FIELDS, _NAME, SOURCE)
    split = functools.partial(
        NpyScenes,
        size=SIZE,
        num_classes=NUM_CLASSES,
        label_field="label",
        normals=True,
        name=_NAME,
    )
    test = split(base / "val", indices=range(n_test))
    if val_fraction == 0:
        train = split(base / "train", indices=range(n_train), augment=augment)
        return {"train": train, "val": test, "test": test}
    kept, held = holdout(n_train, val_fraction, data_seed)
    return {
        "train": split(base / "train", indices=kept, augment=augment),
        "val": split(base / "train", indices=held),
        "test": test,
    }


def tasks() -> TaskSet:
    """Segmentation (cross-entropy; mIoU, pixel accuracy), depth (L1 over measured pixels;
    absolute and relative error), normals (1 - cosine; angle statistics), as in MTAN."""
    return TaskSet(
        [
            Task(
                "segmentation",
                losses.cross_entropy,
                [functools.partial(metrics.Segmentation, NUM_CLASSES)],
            ),
            Task("depth", losses.depth_l1, [metrics.Depth], label_kind="depth"),
            Task("normal", losses.normal_cosine, [metrics.Normals], label_kind="normals"),
        ]
    )


def model(arch: str, task_names: Sequence[str], **options: Any) -> nn.Module:
    """The benchmark's network (``"deeplab"`` or ``"segnet"``) for ``task_names``; options
    (``backbone``, ``width``, ``filters``, ``weights``) as
    :func:`polytask.data._dense_models.dense_model`."""
    return dense_model(arch, task_names, OUT_CHANNELS, **options)


def _load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
    del seed  # the split depends on data_seed only: the same data for every training seed
    return load_nyuv2(root, **options)


def _load_augmented(seed: int = 0, root: str | None = None, **options: Any):
    del seed
    options.setdefault("augment", True)
    return load_nyuv2(root, **options)


_SUMMARY = "NYUv2 (MTAN preprocessed, 288x384): 13-class segmentation, depth, normals"

BENCHMARK = register(
    Benchmark(
        name="nyuv2",
        summary=f"{_SUMMARY}; LibMTL's DeepLab-ResNet-50 recipe",
        source=(
            "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019 "
            "(data); Lin & Zhang, LibMTL, JMLR 2023, examples/nyu (network and recipe)"
        ),
        tasks=tasks,
        load=_load,
        options=options_of(load_nyuv2),
        model=model,
        archs=("deeplab", "segnet"),
        recipe=Recipe(
            epochs=200,
            batch_size=8,
            eval_batch_size=8,
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
        name="nyuv2_segnet",
        summary=f"{_SUMMARY}; the SegNet recipe of CAGrad and Nash-MTL, with augmentation",
        source=(
            "Liu, Johns & Davison, CVPR 2019 (data, SegNet); Liu et al., Conflict-Averse "
            "Gradient Descent, NeurIPS 2021 and Navon et al., Multi-Task Learning as a "
            "Bargaining Game, ICML 2022 (recipe)"
        ),
        tasks=tasks,
        load=_load_augmented,
        options=options_of(load_nyuv2),
        model=model,
        archs=("segnet",),
        recipe=Recipe(
            epochs=200,
            batch_size=2,
            eval_batch_size=2,
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
