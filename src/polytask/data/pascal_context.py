"""PASCAL-Context with five dense tasks, in the multi-task layout of Vandenhende et al.

Data: Mottaghi et al., "The Role of Context for Object Detection and Semantic Segmentation
in the Wild", CVPR 2014 (PASCAL-Context: 10,103 PASCAL VOC 2010 images with full-scene
labels), with the human parts of Chen et al., "Detect What You Can", CVPR 2014
(PASCAL-Part). As a multi-task benchmark: Maninis, Radosavovic & Kokkinos, "Attentive
Single-Tasking of Multiple Tasks" (ASTMT), CVPR 2019, and Vandenhende et al., "Multi-Task
Learning for Dense Prediction Tasks: A Survey", TPAMI 2021, whose code
(SimonVandenhende/Multi-Task-Learning-PyTorch: ``data/pascal_context.py``,
``data/custom_transforms.py``, ``utils/common_config.py``, ``configs/pascal/resnet18``)
this follows.

Layout (their ``PASCAL_MT.tgz``), under ``root``:

* ``ImageSets/Context/{train,val}.txt``: image ids (4,998 and 5,105);
* ``JPEGImages/<id>.jpg``: the image;
* ``semseg/VOC12/<id>.png``, else ``semseg/pascal-context/<id>.png``: the 21 VOC classes
  (0 background), 255 unlabelled;
* ``pascal-context/trainval/<id>.mat``: ``LabelMap``, the full-scene labels (459 classes)
  from which the edges and the normals' valid pixels come;
* ``human_parts/<id>.mat``: PASCAL-Part's ``anno`` struct (objects with their class index,
  mask and named part masks);
* ``normals_distill/<id>.png``: surface normals distilled from a NYUD-trained network,
  RGB = 255 (n + 1) / 2;
* ``sal_distill/<id>.png``: distilled saliency, grey levels thresholded at 0.5.

Tasks, as their code builds them (targets per item):

* ``semseg``: 21 classes, int64 [H, W], -1 unlabelled (their 255); loss cross-entropy,
  metric mIoU (and pixel accuracy).
* ``human_parts``: 7 classes (background and 6 parts: head, torso, upper/lower arms,
  upper/lower legs: their ``HUMAN_PART[6]`` map of PASCAL-Part's names), from the persons
  (class 15) that have part masks; an image with no such person, or whose map is all
  background after augmentation, is unlabelled (-1 everywhere), as their
  ``AddIgnoreRegions``. Loss cross-entropy, metric mIoU.
* ``sal``: binary float [1, H, W]; loss :func:`~polytask.tasks.dense.balanced_bce` with
  the batch's weight; metrics max-F and mIoU over thresholds (their ``SaliencyMeter``).
* ``normals``: float [3, H, W], unit vectors on pixels whose full-scene class is one of
  :data:`NORMALS_VALID_CLASSES`, the zero vector (unlabelled) elsewhere; loss
  :func:`~polytask.tasks.dense.normals_l1`, metric the angle statistics (mean angle).
* ``edge``: binary float [1, H, W], the boundaries of ``LabelMap``: pixels where the
  3x3 Laplacian (:func:`laplacian`, OpenCV's ``Laplacian`` with its default aperture) is
  non-zero, thinned to one pixel (:func:`thin`, the Guo-Hall algorithm of scikit-image's
  ``thin``); loss balanced BCE with ``pos_weight`` 0.95 (their ``edge_w``); metric that
  loss (:class:`~polytask.tasks.dense.BalancedBCELoss`), not their ODS-F (see there).

Fixed loss weights of their multi-task baseline (``loss_kwargs.loss_weights``): semseg 1,
human_parts 2, sal 5, normals 10, edge 50 (:data:`LOSS_WEIGHTS`). In polytask they are the
``ew`` method's weights, in the order of :data:`TASKS`: ``polytask run pascal_context
--method ew --hparam "weights=[1, 2, 5, 10, 50]"`` reproduces their objective; ``ew``
without weights sums the losses unweighted, and the balancing methods start from the
unweighted losses.

Pipeline (their ``get_transformations``): training items are flipped left-right with
probability 1/2 (normals' x negated), then rotated by an angle uniform in [-20, 20] degrees
and scaled by a factor uniform in [0.75, 1.25] about the image centre on a canvas of the
same size (OpenCV's ``warpAffine``: zeros outside, so a zoomed-out border is background
for the label maps and unlabelled for the normals; the normals' in-plane component rotated
with the image); every item is then resized to ``size`` (512 x 512; bicubic for the image
and the normals, which are re-normalised, nearest for the labels), and the image is
normalised with the ImageNet mean and standard deviation. Randomness comes from ``torch``'s
global generator (or the dataset's ``generator``).

Splits: ``test`` is ``val.txt`` (the papers report it); ``val`` is a ``val_fraction``
(default 10%) of ``train.txt`` drawn with ``data_seed``; ``val_fraction=0`` gives the
papers' protocol (``val`` is then the test set).

Departures: (1) their ``ToTensor`` casts the bicubic image to ``uint8``, wrapping values
outside [0, 255]; here they are clamped. (2) The affine warp and the resizes are
``torch``'s ``grid_sample``/``interpolate`` (bicubic with a = -0.75 and half-pixel centres
as OpenCV, but the values near borders differ slightly). (3) Their human-part targets keep
persons whose mask has positive area (their cached ``ImageSets/Parts`` list with
``area_thres=0``); here the same test is made on the ``.mat`` file directly, without the
cache. (4) mIoU averages the classes present in the labels or predictions
(:class:`~polytask.tasks.metrics.Segmentation`); theirs counts an absent class as 0, which
differs only on splits where a class never occurs. (5) Their backbone starts from
ImageNet weights and their heads' outputs are upsampled with ``align_corners=False``; see
:mod:`polytask.data._dense_models` (random initialisation unless ``weights=`` names a
torchvision ResNet checkpoint; ``align_corners=True`` as LibMTL).

Get the data: download ``PASCAL_MT.tgz`` (see :data:`SOURCE`) and unpack it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from polytask.data._dense_models import dense_model
from polytask.data._files import check_flag, check_root, holdout, require
from polytask.data._images import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.benchmark import Benchmark, Recipe, options_of, register
from polytask.errors import DataFormatError
from polytask.tasks import Task, TaskSet, dense, losses, metrics

__all__ = [
    "HUMAN_PARTS",
    "LOSS_WEIGHTS",
    "NORMALS_VALID_CLASSES",
    "NUM_CLASSES",
    "NUM_PARTS",
    "SOURCE",
    "TASKS",
    "PascalContext",
    "augment",
    "edges_from_labels",
    "flip",
    "laplacian",
    "load_pascal_context",
    "model",
    "rotate_normals",
    "scale_rotate",
    "tasks",
    "thin",
]

TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
NUM_CLASSES = 21
NUM_PARTS = 7
OUT_CHANNELS = {"semseg": NUM_CLASSES, "human_parts": NUM_PARTS, "sal": 1, "normals": 3, "edge": 1}
#: Their ``configs/pascal/*/multi_task_baseline.yml`` ``loss_weights``, in :data:`TASKS` order.
LOSS_WEIGHTS = (1.0, 2.0, 5.0, 10.0, 50.0)
#: Their ``edge_w``: the positive weight of the edge loss.
EDGE_POS_WEIGHT = 0.95
SIZE = (512, 512)
ROTATION = 20.0  # degrees, their ScaleNRotate(rots=(-20, 20))
SCALES = (0.75, 1.25)
PERSON = 15  # PASCAL VOC's class index of "person"
#: PASCAL-Part's person part names -> the 6 parts (their ``HUMAN_PART[6]``).
HUMAN_PARTS = {
    **dict.fromkeys(
        ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1
    ),
    "neck": 2,
    "torso": 2,
    "luarm": 3,
    "ruarm": 3,
    "lhand": 4,
    "llarm": 4,
    "rhand": 4,
    "rlarm": 4,
    "luleg": 5,
    "ruleg": 5,
    "lfoot": 6,
    "llleg": 6,
    "rfoot": 6,
    "rlleg": 6,
}
#: Full-scene (459-class) PASCAL-Context labels on which the distilled normals are kept:
#: the classes of ``data/db_info/nyu_classes.json`` (except "unknown") found in
#: ``data/db_info/context_classes.json``, in the order of the former, then "tvmonitor"
#: (427), as their ``PASCALContext.__init__`` builds ``normals_valid_classes``.
NORMALS_VALID_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46,
    49, 50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95,
    96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157,
    158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216,
    219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255,
    260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292,
    293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349,
    350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405,
    407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 429, 430, 432, 440, 441, 442, 443,
    444, 446, 454, 457, 427,
)  # fmt: skip
SOURCE = (
    "Download PASCAL_MT.tgz (https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz, "
    "the archive of SimonVandenhende/Multi-Task-Learning-PyTorch and facebookresearch/astmt) "
    "and unpack it so that <root>/JPEGImages and <root>/ImageSets/Context/train.txt exist."
)
_NAME = "PASCAL-Context"

# ---------------------------------------------------------------------------- edges


def laplacian(labels: np.ndarray) -> np.ndarray:
    """OpenCV's ``Laplacian(src, CV_64F)`` (aperture 1: the kernel [[0, 1, 0], [1, -4, 1],
    [0, 1, 0]], borders reflected without repeating the edge pixel) of a 2-D array."""
    if labels.ndim != 2:
        raise ValueError(f"laplacian expects a 2-D array, got shape {labels.shape}")
    x = np.pad(labels.astype(np.float64), 1, mode="reflect")
    return x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4.0 * x[1:-1, 1:-1]


def _neighbours(image: np.ndarray) -> list[np.ndarray]:
    """x1 ... x8 of Guo & Hall: E, NE, N, NW, W, SW, S, SE (zeros outside the image)."""
    p = np.pad(image, 1)
    c = slice(1, -1)
    return [
        p[c, 2:],  # E
        p[:-2, 2:],  # NE
        p[:-2, c],  # N
        p[:-2, :-2],  # NW
        p[c, :-2],  # W
        p[2:, :-2],  # SW
        p[2:, c],  # S
        p[2:, 2:],  # SE
    ]


def thin(image: np.ndarray) -> np.ndarray:
    """Morphological thinning of a binary image to one-pixel-wide, 8-connected curves: the
    two-subiteration parallel algorithm A1 of Guo & Hall, "Parallel thinning with
    two-subiteration algorithms", Comm. ACM 32(3), 1989, as scikit-image's ``thin``.

    In each subiteration every foreground pixel p with neighbours x1 ... x8 (E, NE, N, NW,
    W, SW, S, SE) is deleted at once when (G1) exactly one of the four pairs
    (¬x1 ∧ (x2 ∨ x3)), (¬x3 ∧ (x4 ∨ x5)), (¬x5 ∧ (x6 ∨ x7)), (¬x7 ∧ (x8 ∨ x1)) holds,
    (G2) 2 <= min(N1, N2) <= 3 with N1 = Σ (x_{2k-1} ∨ x_{2k}) and N2 = Σ (x_{2k} ∨
    x_{2k+1}), and (G3) (x2 ∨ x3 ∨ ¬x8) ∧ x1 is false in the first subiteration, (G3')
    (x6 ∨ x7 ∨ ¬x4) ∧ x5 is false in the second; until nothing changes.
    """
    if image.ndim != 2:
        raise ValueError(f"thin expects a 2-D array, got shape {image.shape}")
    skel = image.astype(bool).copy()
    while True:
        before = int(skel.sum())
        for first in (True, False):
            x = _neighbours(skel)
            x = [None, *x, x[0]]  # 1-based, with x9 = x1
            g1 = sum((~x[i] & (x[i + 1] | x[i + 2])).astype(np.int8) for i in (1, 3, 5, 7)) == 1
            n1 = sum((x[2 * k - 1] | x[2 * k]).astype(np.int8) for k in (1, 2, 3, 4))
            n2 = sum((x[2 * k] | x[2 * k + 1]).astype(np.int8) for k in (1, 2, 3, 4))
            n = np.minimum(n1, n2)
            g2 = (n >= 2) & (n <= 3)
            if first:
                g3 = ~((x[2] | x[3] | ~x[8]) & x[1])
            else:
                g3 = ~((x[6] | x[7] | ~x[4]) & x[5])
            skel &= ~(g1 & g2 & g3)
        if int(skel.sum()) == before:
            return skel


def edges_from_labels(labels: np.ndarray) -> np.ndarray:
    """Their edge target: ``thin(|Laplacian(LabelMap)| > 0)`` as float32 {0, 1}."""
    return thin(np.abs(laplacian(labels)) > 0).astype(np.float32)


# ---------------------------------------------------------------------------- files


def _pil():
    from PIL import Image

    return Image


def _read_array(path: Path, what: str) -> np.ndarray:
    try:
        with _pil().open(path) as img:
            return np.asarray(img).copy()
    except OSError as exc:
        raise DataFormatError(f"{_NAME}: cannot decode {path} ({what}): {exc}") from None


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(path)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{_NAME}: cannot read {path} as a .mat file: {exc}") from None


def _label_map(path: Path) -> np.ndarray:
    mat = _loadmat(path)
    if "LabelMap" not in mat or np.asarray(mat["LabelMap"]).ndim != 2:
        raise DataFormatError(f"{_NAME}: {path} holds no 2-D 'LabelMap'")
    return np.asarray(mat["LabelMap"])


def _human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Part ids (0 background, 1 ... 6) of the persons with part masks, as their
    ``_load_human_parts``; all zeros when the image has none."""
    try:
        objects = _loadmat(path)["anno"][0][0][1][0]
        target = np.zeros(shape, dtype=np.int64)
        persons = [obj for obj in objects if int(obj[1][0][0]) == PERSON]
        # Their cached object list keeps an object whose mask has a positive area.
        if not any(float(np.sum(obj[2])) > 0 for obj in persons):
            return target
        for obj in persons:
            if len(obj[3]) == 0:
                continue
            for part in obj[3][0]:
                name = str(part[0][0])
                mask = np.asarray(part[1]).astype(bool)
                if mask.shape != shape:
                    raise DataFormatError(
                        f"{_NAME}: {path}: part mask of shape {mask.shape} for an image of "
                        f"shape {shape}"
                    )
                if name not in HUMAN_PARTS:
                    raise DataFormatError(f"{_NAME}: {path}: unknown person part {name!r}")
                target[mask] = HUMAN_PARTS[name]
    except (KeyError, IndexError, TypeError) as exc:
        raise DataFormatError(
            f"{_NAME}: {path} is not a PASCAL-Part annotation (anno.objects with class_ind, "
            f"mask and parts): {exc!r}"
        ) from None
    return target


# ---------------------------------------------------------------------------- transforms


def _affine_grid(h: int, w: int, angle: float, scale: float) -> Tensor:
    """The sampling grid of OpenCV's ``warpAffine(x, getRotationMatrix2D((w/2, h/2), angle,
    scale), (w, h))``: output pixel (x, y) reads the input at M^-1 (x, y)."""
    theta = math.radians(angle)
    a, b = scale * math.cos(theta), scale * math.sin(theta)
    cx, cy = w / 2, h / 2
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    # M = [[a, b, (1-a)cx - b cy], [-b, a, b cx + (1-a)cy]]: its inverse about the centre.
    dx, dy = xs - cx, ys - cy
    det = a * a + b * b
    sx = (a * dx - b * dy) / det + cx
    sy = (b * dx + a * dy) / det + cy
    # Pixel centres at integer coordinates -> grid_sample's [-1, 1] (align_corners=False).
    grid = torch.stack(((2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1), dim=-1)
    return grid.float().unsqueeze(0)


def _warp(x: Tensor, grid: Tensor, mode: str) -> Tensor:
    return F.grid_sample(
        x.unsqueeze(0), grid, mode=mode, padding_mode="zeros", align_corners=False
    ).squeeze(0)


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x.unsqueeze(0), size=size, mode=mode, **kwargs).squeeze(0)


def _unit(normals: Tensor) -> Tensor:
    """Their ``FixedResize`` re-normalisation: n / (|n| + eps); zero vectors stay zero."""
    eps = float(np.finfo(np.float32).eps)
    return normals / (normals.norm(dim=0, keepdim=True) + eps)


def rotate_normals(normals: Tensor, angle: float) -> Tensor:
    """The in-plane part of the normals turned with an image rotated by ``angle`` degrees
    (their ``ScaleNRotate``: the angle atan2(n_x, n_y) grows by ``angle``)."""
    t = math.radians(angle)
    nx, ny = normals[0], normals[1]
    return torch.stack(
        (nx * math.cos(t) + ny * math.sin(t), ny * math.cos(t) - nx * math.sin(t), normals[2])
    )


def augment(maps: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Their training augmentation on float maps [C, H, W] (``image``, the label maps,
    ``normals``): a flip with probability 1/2 (normals' x negated), then a rotation
    uniform in [-20, 20] degrees and a scale uniform in [0.75, 1.25] about the centre."""
    out = flip(maps) if float(torch.rand((), generator=generator)) < 0.5 else dict(maps)
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    angle = 2 * ROTATION * u[0] - ROTATION
    scale = (SCALES[1] - SCALES[0]) * u[1] - (SCALES[1] - SCALES[0]) / 2 + 1
    return scale_rotate(out, angle, scale)


def flip(maps: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every map mirrored left-right, and the normals' x component negated."""
    out = {k: v.flip(-1) for k, v in maps.items()}
    if "normals" in out:
        out["normals"] = out["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def scale_rotate(maps: dict[str, Tensor], angle: float, scale: float) -> dict[str, Tensor]:
    """Every map warped as OpenCV's ``warpAffine`` with ``getRotationMatrix2D(centre,
    angle, scale)`` (bicubic for ``image`` and ``normals``, nearest for the labels)."""
    h, w = next(iter(maps.values())).shape[-2:]
    grid = _affine_grid(h, w, angle, scale)
    out = {}
    for key, value in maps.items():
        if key == "normals":
            value = rotate_normals(value, angle)
        smooth = key in ("image", "normals")
        out[key] = _warp(value, grid, "bicubic" if smooth else "nearest")
    return out


# ---------------------------------------------------------------------------- dataset


class PascalContext(Dataset):
    """The items of one split (ids from ``ImageSets/Context/<split>.txt``) as
    ``(image [3, H, W], {task: target})``; see the module docstring for the targets.

    Args:
        root: the unpacked ``PASCAL_MT`` folder.
        ids: the image ids of the split.
        size: the (H, W) every item is resized to (their 512 x 512).
        augment: their training augmentation.
        generator: the source of the augmentation's randomness (``torch``'s global one when
            ``None``).
    """

    def __init__(
        self,
        root: Path,
        ids: Sequence[str],
        *,
        size: tuple[int, int] = SIZE,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.size = (int(size[0]), int(size[1]))
        self.augment = augment
        self.generator = generator
        # Their loader asserts every file at construction: a missing one is named now,
        # not hours into training.
        for image_id in self.ids:
            for path in self._paths(image_id).values():
                require(path, _NAME, SOURCE)

    def __len__(self) -> int:
        return len(self.ids)

    def _paths(self, image_id: str) -> dict[str, Path]:
        voc = self.root / "semseg" / "VOC12" / f"{image_id}.png"
        semseg = (
            voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{image_id}.png"
        )
        return {
            "image": self.root / "JPEGImages" / f"{image_id}.jpg",
            "semseg": semseg,
            "labels": self.root / "pascal-context" / "trainval" / f"{image_id}.mat",
            "human_parts": self.root / "human_parts" / f"{image_id}.mat",
            "normals": self.root / "normals_distill" / f"{image_id}.png",
            "sal": self.root / "sal_distill" / f"{image_id}.png",
        }

    def _raw(self, image_id: str) -> dict[str, Tensor]:
        """Float maps [C, H, W] at the image's size, before augmentation and resizing."""
        paths = self._paths(image_id)
        image = _read_array(paths["image"], "image")
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] < 3:
            raise DataFormatError(f"{_NAME}: {paths['image']} is not an RGB image")
        image = image[..., :3].astype(np.float32)
        shape = image.shape[:2]
        semseg = _read_array(paths["semseg"], "semantic labels")
        if semseg.ndim != 2:
            raise DataFormatError(f"{_NAME}: {paths['semseg']} must be a single-channel png")
        bad = (semseg >= NUM_CLASSES) & (semseg != 255)
        if bad.any():
            raise DataFormatError(
                f"{_NAME}: {paths['semseg']} has labels {sorted(set(semseg[bad].tolist()))[:5]}; "
                f"expected 0 .. {NUM_CLASSES - 1} or 255"
            )
        labels = _label_map(paths["labels"])
        parts = _human_parts(paths["human_parts"], labels.shape)
        normals = _read_array(paths["normals"], "normals")
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DataFormatError(f"{_NAME}: {paths['normals']} must be an RGB png")
        if normals.shape[:2] != labels.shape:
            raise DataFormatError(
                f"{_NAME}: {paths['normals']} is {normals.shape[:2]} but its LabelMap "
                f"{paths['labels']} is {labels.shape}"
            )
        normals = 2.0 * normals.astype(np.float32) / 255.0 - 1.0
        normals[~np.isin(labels, NORMALS_VALID_CLASSES)] = 0.0
        sal = _read_array(paths["sal"], "saliency")
        if sal.ndim != 2:
            raise DataFormatError(f"{_NAME}: {paths['sal']} must be a grey-level png")
        sal = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
        maps = {
            "image": torch.from_numpy(image).permute(2, 0, 1),
            "semseg": torch.from_numpy(semseg.astype(np.float32))[None],
            "human_parts": torch.from_numpy(parts.astype(np.float32))[None],
            "sal": torch.from_numpy(sal)[None],
            "normals": torch.from_numpy(normals).permute(2, 0, 1),
            "edge": torch.from_numpy(edges_from_labels(labels))[None],
        }
        # Their loader resizes every target to the image's size (nearest; bicubic normals).
        for key, value in maps.items():
            if tuple(value.shape[-2:]) != shape:
                maps[key] = _resize(value, shape, "bicubic" if key == "normals" else "nearest")
        return maps

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        maps = self._raw(self.ids[i])
        if self.augment:
            maps = augment(maps, self.generator)
        maps = {
            k: _resize(v, self.size, "bicubic" if k in ("image", "normals") else "nearest")
            for k, v in maps.items()
        }
        image = maps["image"].clamp(0, 255).round() / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image = (image - mean) / std
        semseg = maps["semseg"][0].round().long()
        semseg[semseg == 255] = -1
        parts = maps["human_parts"][0].round().long()
        if not bool((parts != 0).any()):
            parts.fill_(-1)  # their AddIgnoreRegions: no part annotation in view
        targets = {
            "semseg": semseg,
            "human_parts": parts,
            "sal": maps["sal"],
            "normals": _unit(maps["normals"]),
            "edge": maps["edge"],
        }
        return image, targets


def _read_ids(root: Path, split: str) -> list[str]:
    path = require(root / "ImageSets" / "Context" / f"{split}.txt", _NAME, SOURCE)
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataFormatError(f"{_NAME}: {path} lists no image ids")
    return ids


def load_pascal_context(
    root: str | Path | None,
    *,
    val_fraction: float = 0.1,
    augment: bool = True,
    data_seed: int = 0,
    size: tuple[int, int] = SIZE,
) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` under ``root`` (see the module docstring); ``augment``
    (their training augmentation, on by default as in their code) applies to ``train``."""
    check_flag("augment", augment)
    base = check_root(root, _NAME, SOURCE)
    train_ids, test_ids = _read_ids(base, "train"), _read_ids(base, "val")
    split = functools.partial(PascalContext, base, size=size)
    test = split(test_ids)
    if val_fraction == 0:
        return {"train": split(train_ids, augment=augment), "val": test, "test": test}
    kept, held = holdout(len(train_ids), val_fraction, data_seed)
    return {
        "train": split([train_ids[i] for i in kept], augment=augment),
        "val": split([train_ids[i] for i in held]),
        "test": test,
    }


def tasks() -> TaskSet:
    """The five tasks with their losses and metrics (see the module docstring)."""
    return TaskSet(
        [
            Task(
                "semseg",
                losses.cross_entropy,
                [functools.partial(metrics.Segmentation, NUM_CLASSES)],
            ),
            Task(
                "human_parts",
                losses.cross_entropy,
                [functools.partial(metrics.Segmentation, NUM_PARTS)],
            ),
            Task("sal", dense.balanced_bce, [dense.SaliencyMaxF]),
            Task("normals", dense.normals_l1, [metrics.Normals], label_kind="normals"),
            Task(
                "edge",
                functools.partial(dense.balanced_bce, pos_weight=EDGE_POS_WEIGHT),
                [functools.partial(dense.BalancedBCELoss, EDGE_POS_WEIGHT)],
            ),
        ]
    )


def model(arch: str, task_names: Sequence[str], **options: Any) -> nn.Module:
    """Their ResNet baseline: a dilated ResNet (output stride 8; ``backbone="resnet18"`` by
    default as their ``configs/pascal/resnet18``) shared by all tasks and one DeepLab-v3
    head per task (:func:`polytask.data._dense_models.dense_model`; options ``backbone``,
    ``width``, ``weights``)."""
    options.setdefault("backbone", "resnet18")
    return dense_model(arch, task_names, OUT_CHANNELS, **options)


def _load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
    del seed  # the split depends on data_seed only
    return load_pascal_context(root, **options)


BENCHMARK = register(
    Benchmark(
        name="pascal_context",
        summary=(
            "PASCAL-Context (PASCAL_MT, 512x512): semseg, human parts, saliency, normals, "
            "edges; dilated ResNet-18 + DeepLab heads; their fixed weights are ew's "
            "weights=[1, 2, 5, 10, 50]"
        ),
        source=(
            "Mottaghi et al., CVPR 2014 and Chen et al., CVPR 2014 (data); Maninis et al., "
            "ASTMT, CVPR 2019 and Vandenhende et al., Multi-Task Learning for Dense "
            "Prediction Tasks: A Survey, TPAMI 2021 (tasks, network, recipe)"
        ),
        tasks=tasks,
        load=_load,
        options=options_of(load_pascal_context),
        model=model,
        archs=("deeplab",),
        # configs/pascal/resnet18/multi_task_baseline.yml: Adam lr 1e-4, weight decay 1e-4,
        # batch 6, 100 epochs, poly schedule (power 0.9, per epoch).
        recipe=Recipe(
            epochs=100,
            batch_size=6,
            eval_batch_size=6,
            optimizer="adam",
            lr=1e-4,
            weight_decay=1e-4,
            scheduler="poly",
            poly_power=0.9,
        ),
        needs_root=True,
    )
)
