"""Losses and metrics of the dense-prediction benchmarks of Vandenhende et al.

Vandenhende, Georgoulis, Van Gansbeke, Proesmans, Dai & Van Gool, "Multi-Task Learning for
Dense Prediction Tasks: A Survey", TPAMI 2021, whose code (SimonVandenhende/
Multi-Task-Learning-PyTorch, ``losses/loss_functions.py`` and ``evaluation/eval_*.py``,
taken from Maninis et al.'s ASTMT) defines the PASCAL-Context tasks:

* :func:`balanced_bce`: their ``BalancedCrossEntropyLoss`` (HED's class-balanced binary
  cross-entropy) for saliency (the weight from the batch) and edges (a fixed weight, 0.95);
* :func:`normals_l1`: their ``NormalsLoss(normalize=True, norm=1)``;
* :class:`SaliencyMaxF`: their ``SaliencyMeter`` (max F-measure and mIoU over 15 thresholds);
* :class:`BalancedBCELoss`: their ``EdgeMeter``, the loss they log for edges during training
  (the benchmark's edge score, ODS-F, needs the MATLAB SEISM toolbox; see the class).

Missing labels follow :mod:`polytask.tasks.losses`: NaN for binary maps, the zero vector for
normals.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.tasks.metrics import TaskMetric

__all__ = ["SALIENCY_THRESHOLDS", "BalancedBCELoss", "SaliencyMaxF", "balanced_bce", "normals_l1"]

#: The thresholds of their ``SaliencyMeter``: ``np.linspace(0.2, 0.9, 15)``.
SALIENCY_THRESHOLDS = tuple(np.linspace(0.2, 0.9, 15).tolist())


def _balanced_terms(
    logits: Tensor, target: Tensor, pos_weight: float | None
) -> tuple[Tensor, Tensor]:
    """(sum of the weighted per-pixel losses, number of labelled pixels)."""
    logits = logits.reshape(target.shape) if logits.numel() == target.numel() else logits
    if logits.shape != target.shape:
        raise ValueError(
            f"balanced_bce: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
            "must have the same shape"
        )
    mask = ~torch.isnan(target)
    labels = (torch.nan_to_num(target) >= 0.5).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask
    pos = (labels * per_pixel).sum()
    neg = ((1.0 - labels) * per_pixel).sum()
    count = mask.sum()
    if pos_weight is None:
        # HED's weight: the fraction of negative pixels in the batch.
        w = ((1.0 - labels) * mask).sum() / count.clamp_min(1)
    else:
        w = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return w * pos + (1.0 - w) * neg, count


def balanced_bce(logits: Tensor, target: Tensor, *, pos_weight: float | None = None) -> Tensor:
    r"""Class-balanced binary cross-entropy (Xie & Tu, "Holistically-Nested Edge Detection",
    ICCV 2015), as Vandenhende et al.'s ``BalancedCrossEntropyLoss(size_average=True)``:

    .. math:: \frac{1}{N}\Big(w \sum_{y_i = 1} \ell_i + (1 - w) \sum_{y_i = 0} \ell_i\Big)

    with :math:`\ell_i` the binary cross-entropy of logit i, :math:`y_i = [t_i \ge 0.5]`,
    N the number of labelled pixels and w = ``pos_weight``, or, when ``pos_weight`` is
    ``None``, the fraction of negative labelled pixels in the batch (HED's weighting; their
    saliency loss). Their edge loss uses ``pos_weight=0.95``. NaN targets are missing; a
    batch without labels gives an exact zero connected to ``logits``.
    """
    if pos_weight is not None and not 0.0 <= pos_weight <= 1.0:
        raise ValueError(f"pos_weight={pos_weight} must be in [0, 1] (or None for HED's)")
    total, count = _balanced_terms(logits, target, pos_weight)
    if int(count) == 0:
        return logits.sum() * 0.0
    return total / count


def normals_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 distance between the L2-normalised prediction and the target normal, averaged over
    the components of the labelled pixels (a non-zero target vector), as Vandenhende et al.'s
    ``NormalsLoss(normalize=True, norm=1)``: the prediction is divided by its norm + 1e-12,
    and the sum of absolute differences by the number of labelled elements (3 per pixel).
    Shapes [B, 3, H, W]."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(
            f"normals_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both "
            "be [B, 3, H, W]"
        )
    unit = pred / (pred.norm(dim=1, keepdim=True) + 1e-12)
    mask = (target.abs().sum(dim=1, keepdim=True) != 0).expand_as(target)
    count = mask.sum()
    if int(count) == 0:
        return pred.sum() * 0.0
    return ((unit - target).abs() * mask).sum() / count


class SaliencyMaxF(TaskMetric):
    """Saliency scores of Vandenhende et al.'s ``SaliencyMeter`` (from ASTMT), for logits
    [B, 1, H, W] and binary targets [B, 1, H, W] (NaN pixels are skipped).

    For each threshold τ in :data:`SALIENCY_THRESHOLDS` the mask sigmoid(logit) > τ gives,
    per image, the IoU with the target (1 when both are empty), the precision
    tp / (tp + fp + 1e-12) and the recall tp / (tp + fn + 1e-12); each is averaged over the
    images of the split. ``max_f`` is the largest F = 2PR / (P + R + 1e-12) of the averaged
    precision P and recall R over the thresholds, ``miou`` the largest averaged IoU (their
    ``maxF`` and ``mIoU``; both higher is better).
    """

    def __init__(self) -> None:
        super().__init__()
        self.directions = {"max_f": True, "miou": True}
        self.register_buffer(
            "thresholds", torch.tensor(SALIENCY_THRESHOLDS, dtype=torch.float64), persistent=False
        )
        n = len(SALIENCY_THRESHOLDS)
        for name in ("iou", "precision", "recall"):
            self.add_state(name, torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        pred = pred.reshape(target.shape) if pred.numel() == target.numel() else pred
        if pred.shape != target.shape:
            raise ValueError(
                f"SaliencyMaxF: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                "must have the same shape"
            )
        b = target.shape[0]
        valid = (~torch.isnan(target)).reshape(b, 1, -1)
        gt = (torch.nan_to_num(target) >= 0.5).reshape(b, 1, -1) & valid
        prob = torch.sigmoid(pred.double()).reshape(b, 1, -1)
        masks = (prob > self.thresholds.view(1, -1, 1)) & valid  # [B, T, P]
        tp = (masks & gt).sum(-1).double()
        fp = (masks & ~gt).sum(-1).double()
        fn = (~masks & gt).sum(-1).double()
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        self.iou += iou.sum(0)
        self.precision += (tp / (tp + fp + 1e-12)).sum(0)
        self.recall += (tp / (tp + fn + 1e-12)).sum(0)
        self.images += b

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        n = float(self.images)
        if n == 0:
            return {"max_f": math.nan, "miou": math.nan}
        p, r = self.precision / n, self.recall / n
        f = 2 * p * r / (p + r + 1e-12)
        return {"max_f": float(f.max()), "miou": float((self.iou / n).max())}


class BalancedBCELoss(TaskMetric):
    """The class-balanced cross-entropy of :func:`balanced_bce` with a fixed ``pos_weight``,
    summed over the pixels of the split and divided by their number (``loss``, lower is
    better): Vandenhende et al.'s ``EdgeMeter``, the edge score they log during training.

    Departures: (1) their meter feeds sigmoid(logit) to the loss, which treats it as a logit
    again (``get_output`` maps edges to 255 * sigmoid, the meter divides by 255); here the
    loss is of the logits, the quantity the network is trained on. (2) Their reported edge
    score is the optimal-dataset-scale F-measure (ODS-F) of the SEISM MATLAB toolbox, which
    matches thinned predicted and true edges within a distance tolerance over 99
    thresholds; that is not computed here, so Δm over edges is not comparable with theirs.
    """

    def __init__(self, pos_weight: float = 0.95) -> None:
        super().__init__()
        if not 0.0 <= pos_weight <= 1.0:
            raise ValueError(f"pos_weight={pos_weight} must be in [0, 1]")
        self.pos_weight = pos_weight
        self.directions = {"loss": False}
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        total, count = _balanced_terms(pred.double(), target.double(), self.pos_weight)
        self.total += total
        self.count += count

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        n = float(self.count)
        return {"loss": float(self.total) / n if n else math.nan}
