"""Task metrics that accumulate over batches, skip missing labels and reduce across ranks.

Every metric is a :class:`torchmetrics.Metric` (so ``compute()`` sums its states across DDP
ranks) whose :meth:`~TaskMetric.compute` returns a dict of named values, and which declares
for each name whether higher is better (:attr:`TaskMetric.directions`), what Δm needs.
Where torchmetrics has the metric (accuracy, F1, AUROC) it does the work; the dense-prediction
metrics are sums over labelled pixels, so a split's value is exactly the per-pixel mean over
the whole split (not a mean of per-batch means, which depends on the batch size).
Missing labels follow :mod:`polytask.tasks.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryF1Score,
    MulticlassF1Score,
)

__all__ = [
    "AUC",
    "F1",
    "Accuracy",
    "Depth",
    "MeanError",
    "Normals",
    "Segmentation",
    "TaskMetric",
]


class TaskMetric(Metric):
    """A metric with named outputs and their directions (``True``: higher is better)."""

    directions: dict[str, bool]
    full_state_update = False

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        raise NotImplementedError


def _binary_mask(target: Tensor, ignore_index: int) -> Tensor:
    return ~torch.isnan(target) if target.is_floating_point() else target != ignore_index


class Accuracy(TaskMetric):
    """Top-1 accuracy over labelled samples: ``num_classes=None`` for binary logits [B]
    (threshold 0), else multi-class logits [B, C] (torchmetrics' micro accuracy)."""

    def __init__(self, num_classes: int | None = None, *, ignore_index: int = -1) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.directions = {"acc": True}
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if self.num_classes is None:
            pred, target = pred.reshape(-1), target.reshape(-1)
            mask = _binary_mask(target, self.ignore_index)
            hits = (pred[mask] > 0).long() == target[mask].long()
        else:
            mask = target != self.ignore_index
            hits = pred.argmax(dim=1)[mask] == target[mask]
        self.correct += hits.sum()
        self.total += hits.numel()

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        total = int(self.total)
        return {"acc": float(self.correct) / total if total else math.nan}


class F1(TaskMetric):
    """F1 score over labelled samples (torchmetrics): binary logits [B] when
    ``num_classes=None``, else multi-class logits [B, C] with ``average`` ("macro" default)."""

    def __init__(
        self, num_classes: int | None = None, *, average: str = "macro", ignore_index: int = -1
    ) -> None:
        super().__init__()
        self.directions = {"f1": True}
        self.ignore_index = ignore_index
        self.inner = (
            BinaryF1Score()
            if num_classes is None
            else MulticlassF1Score(num_classes, average=average, ignore_index=ignore_index)
        )
        self.binary = num_classes is None

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if self.binary:
            pred, target = pred.reshape(-1), target.reshape(-1)
            mask = _binary_mask(target, self.ignore_index)
            self.inner.update(torch.sigmoid(pred[mask]), target[mask].long())
        else:
            self.inner.update(pred, target.long())

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        return {"f1": float(self.inner.compute())}

    def reset(self) -> None:
        super().reset()
        self.inner.reset()


class AUC(TaskMetric):
    """Area under the ROC curve of binary logits [B] (torchmetrics' exact AUROC over the
    whole split; NaN or -1 targets are missing)."""

    def __init__(self) -> None:
        super().__init__()
        self.directions = {"auc": True}
        self.inner = BinaryAUROC()
        self.add_state("positives", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        pred, target = pred.reshape(-1), target.reshape(-1)
        mask = _binary_mask(target, -1)
        labels = target[mask].long()
        self.positives += (labels == 1).sum()
        self.negatives += (labels == 0).sum()
        self.inner.update(pred[mask].float(), labels)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        # AUC is undefined without both classes (torchmetrics only warns and returns 0); the
        # class counts are summed across ranks like every state.
        if int(self.positives) == 0 or int(self.negatives) == 0:
            return {"auc": math.nan}
        return {"auc": float(self.inner.compute())}

    def reset(self) -> None:
        super().reset()
        self.inner.reset()


class MeanError(TaskMetric):
    """Mean absolute or squared error over labelled entries (NaN targets are missing).

    With ``targets=[name, ...]`` the last dimension holds one regression target per name and
    each gets its own value (``mae_<name>``), as reported per target on QM9; ``normalizer``
    (one std per target) converts normalised predictions back to the targets' units.
    """

    def __init__(
        self,
        kind: str = "mae",
        *,
        targets: Sequence[str] | None = None,
        normalizer: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("mae", "mse"):
            raise ValueError(f"kind={kind!r} must be 'mae' or 'mse'")
        self.kind = kind
        self.targets = None if targets is None else list(targets)
        n = 1 if self.targets is None else len(self.targets)
        if normalizer is not None and len(normalizer) != n:
            raise ValueError(f"normalizer has {len(normalizer)} entries for {n} target(s)")
        self.register_buffer(
            "scale", torch.as_tensor(normalizer if normalizer else [1.0] * n, dtype=torch.float64)
        )
        self.names = [kind] if self.targets is None else [f"{kind}_{t}" for t in self.targets]
        self.directions = dict.fromkeys(self.names, False)
        self.add_state("err", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        n = self.err.numel()
        pred = pred.reshape(target.shape) if pred.numel() == target.numel() else pred
        target = target.reshape(-1, n).double()
        pred = pred.reshape(-1, n).double()
        mask = ~torch.isnan(target)
        diff = (pred - torch.nan_to_num(target)) * self.scale.to(pred.device)
        diff = diff.abs() if self.kind == "mae" else diff**2
        self.err += (diff * mask).sum(dim=0)
        self.count += mask.sum(dim=0)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        values = torch.where(self.count > 0, self.err / self.count.clamp_min(1), torch.nan)
        return dict(zip(self.names, values.tolist()))


class Segmentation(TaskMetric):
    """mIoU and pixel accuracy of logits [B, C, H, W] against labels [B, H, W] from one
    confusion matrix over the whole split (pixels labelled ``ignore_index`` are skipped).
    mIoU averages the IoU of the classes that occur in the labels or the predictions (a class
    absent from both has no defined IoU), as MTAN/LibMTL do."""

    def __init__(self, num_classes: int, *, ignore_index: int = -1) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.directions = {"miou": True, "pix_acc": True}
        self.add_state(
            "confusion",
            torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        labels = pred.argmax(dim=1).reshape(-1)
        target = target.reshape(-1).long()
        mask = target != self.ignore_index
        bad = target[mask]
        if bad.numel() and (int(bad.min()) < 0 or int(bad.max()) >= self.num_classes):
            raise ValueError(
                f"segmentation labels must be in [0, {self.num_classes}) or ignore_index="
                f"{self.ignore_index}; got values in [{int(bad.min())}, {int(bad.max())}]"
            )
        idx = target[mask] * self.num_classes + labels[mask]
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        c = self.confusion.double()
        tp = c.diagonal()
        union = c.sum(0) + c.sum(1) - tp
        seen = union > 0
        miou = float((tp[seen] / union[seen]).mean()) if bool(seen.any()) else math.nan
        total = float(c.sum())
        return {"miou": miou, "pix_acc": float(tp.sum()) / total if total else math.nan}


class Depth(TaskMetric):
    """Absolute and relative depth error over pixels with a measured depth (target != 0):
    abs_err = mean |pred - gt|, rel_err = mean |pred - gt| / gt, per pixel over the split."""

    def __init__(self) -> None:
        super().__init__()
        self.directions = {"abs_err": False, "rel_err": False}
        for name in ("abs_sum", "rel_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        mask = target != 0
        diff = (pred.double() - target.double()).abs()[mask]
        self.abs_sum += diff.sum()
        self.rel_sum += (diff / target.double()[mask].abs()).sum()
        self.count += mask.sum()

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        n = float(self.count)
        if n == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": float(self.abs_sum) / n, "rel_err": float(self.rel_sum) / n}


class Normals(TaskMetric):
    """Angular error of surface normals [B, 3, H, W] over pixels with a ground-truth normal:
    mean and median angle (degrees, lower is better) and the fraction within 11.25, 22.5
    and 30 degrees (higher is better), the metrics of Eigen & Fergus (ICCV 2015) used by MTAN.

    The median comes from a histogram of 0.01-degree bins (exact to 0.01 degrees) so the state
    is small and sums across ranks; the other values are exact.
    """

    BINS = 18000  # 0.01 degree bins over [0, 180]

    def __init__(self) -> None:
        super().__init__()
        self.directions = {
            "mean_angle": False,
            "median_angle": False,
            "within_11.25": True,
            "within_22.5": True,
            "within_30": True,
        }
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(self.BINS, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        mask = target.abs().sum(dim=1) != 0
        p = pred.double() / pred.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = target.double() / target.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (p * t).sum(dim=1)[mask].clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cos))
        self.angle_sum += angle.sum()
        idx = (angle * 100).long().clamp(0, self.BINS - 1)
        self.hist += torch.bincount(idx, minlength=self.BINS)
        for i, limit in enumerate((11.25, 22.5, 30.0)):
            self.within[i] += (angle < limit).sum()

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        n = int(self.hist.sum())
        if n == 0:
            return dict.fromkeys(self.directions, math.nan)
        cum = torch.cumsum(self.hist, 0)
        # The lower median's bin, reported at the bin's centre.
        median_bin = int(torch.searchsorted(cum, torch.tensor((n + 1) // 2)))
        return {
            "mean_angle": float(self.angle_sum) / n,
            "median_angle": (median_bin + 0.5) / 100,
            "within_11.25": int(self.within[0]) / n,
            "within_22.5": int(self.within[1]) / n,
            "within_30": int(self.within[2]) / n,
        }
