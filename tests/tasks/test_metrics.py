"""Task metrics against scikit-learn and hand-computed cases, accumulated over batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from polytask.tasks import SplitMetrics, Task, TaskSet, losses
from polytask.tasks.metrics import AUC, F1, Accuracy, Depth, MeanError, Normals, Segmentation

GEN = torch.Generator().manual_seed(0)


def batches(metric, preds, targets, sizes=(3, 5, 4)):
    """Feed in uneven batches: the result must not depend on how the split is cut."""
    start = 0
    for n in sizes:
        metric.update(preds[start : start + n], targets[start : start + n])
        start += n
    assert start == len(preds)
    return metric.compute()


def test_multiclass_accuracy_and_f1_match_sklearn_and_skip_missing():
    logits = torch.randn(12, 4, generator=GEN)
    target = torch.randint(0, 4, (12,), generator=GEN)
    target[[2, 7]] = -1
    keep = target != -1
    y, p = target[keep].numpy(), logits.argmax(1)[keep].numpy()
    acc = batches(Accuracy(4), logits, target)["acc"]
    assert math.isclose(acc, accuracy_score(y, p))
    f1 = batches(F1(4), logits, target)["f1"]
    assert math.isclose(f1, f1_score(y, p, average="macro", labels=range(4)), rel_tol=1e-6)


def test_binary_auc_accuracy_f1_match_sklearn_with_nan_labels():
    logits = torch.randn(12, generator=GEN)
    target = torch.randint(0, 2, (12,), generator=GEN).float()
    target[5] = float("nan")
    keep = ~torch.isnan(target)
    y, s = target[keep].numpy(), logits[keep].numpy()
    assert math.isclose(batches(AUC(), logits, target)["auc"], roc_auc_score(y, s), rel_tol=1e-6)
    assert math.isclose(batches(Accuracy(), logits, target)["acc"], accuracy_score(y, s > 0))
    f1 = batches(F1(), logits, target)["f1"]
    assert math.isclose(f1, f1_score(y, s > 0), rel_tol=1e-6)


def test_mean_errors_match_sklearn_and_per_target_values():
    pred = torch.randn(12, 3, generator=GEN)
    target = torch.randn(12, 3, generator=GEN)
    got = batches(MeanError("mae"), pred, target)["mae"]
    assert math.isclose(
        got, mean_absolute_error(target.double().numpy(), pred.double().numpy()), rel_tol=1e-9
    )
    got = batches(MeanError("mse"), pred, target)["mse"]
    assert math.isclose(
        got, mean_squared_error(target.double().numpy(), pred.double().numpy()), rel_tol=1e-9
    )
    target[0, 1] = float("nan")
    per = batches(MeanError("mae", targets=["a", "b", "c"], normalizer=[1, 2, 3]), pred, target)
    for j, name in enumerate("abc"):
        col = ~torch.isnan(target[:, j])
        expected = ((pred[col, j].double() - target[col, j]).abs() * (j + 1)).mean().item()
        assert math.isclose(per[f"mae_{name}"], expected, rel_tol=1e-9)


def test_segmentation_from_one_confusion_matrix():
    logits = torch.randn(4, 3, 5, 5, generator=GEN)
    target = torch.randint(0, 3, (4, 5, 5), generator=GEN)
    target[0, 0, :] = -1
    keep = target != -1
    y, p = target[keep].numpy(), logits.argmax(1)[keep].numpy()
    cm = confusion_matrix(y, p, labels=range(3))
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    got = batches(Segmentation(3), logits, target, sizes=(1, 2, 1))
    assert math.isclose(got["miou"], iou.mean(), rel_tol=1e-12)
    assert math.isclose(got["pix_acc"], np.trace(cm) / cm.sum(), rel_tol=1e-12)


def test_segmentation_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        Segmentation(3).update(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 3))


def test_depth_errors_are_per_pixel_over_the_split():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    gt = torch.tensor([[[[2.0, 0.0], [3.0, 2.0]]], [[[1.0, 4.0], [0.0, 0.0]]]])
    # labelled pixels: (1,2) (3,3) (4,2) (2,1) (2,4): |d| = 1, 0, 2, 1, 2
    got = batches(Depth(), pred, gt, sizes=(1, 1))
    assert math.isclose(got["abs_err"], 6 / 5)
    assert math.isclose(got["rel_err"], (1 / 2 + 0 + 2 / 2 + 1 / 1 + 2 / 4) / 5)


def test_normal_angles_hand_computed():
    # Five labelled pixels at known angles 0, 10, 20, 45, 90 degrees; one unlabelled pixel.
    angles = torch.tensor([0.0, 10.0, 20.0, 45.0, 90.0, 33.0])
    rad = torch.deg2rad(angles)
    gt = torch.zeros(1, 3, 1, 6)
    gt[0, 2] = 1.0
    gt[0, :, 0, 5] = 0.0
    pred = torch.stack([torch.sin(rad), torch.zeros(6), torch.cos(rad)]).view(1, 3, 1, 6) * 2.5
    got = Normals()
    got.update(pred, gt)
    out = got.compute()
    assert math.isclose(out["mean_angle"], 165 / 5, rel_tol=1e-6)
    assert abs(out["median_angle"] - 20.0) <= 0.01
    assert out["within_11.25"] == 2 / 5
    assert out["within_22.5"] == 3 / 5
    assert out["within_30"] == 3 / 5


def test_task_set_directions_losses_and_split_metrics():
    tasks = TaskSet(
        [
            Task("cls", losses.cross_entropy, [lambda: Accuracy(3)]),
            Task("reg", losses.mse, [lambda: MeanError("mae")]),
        ]
    )
    assert tasks.directions == {"cls/acc": True, "reg/mae": False}
    out = {"cls": torch.randn(4, 3, generator=GEN), "reg": torch.randn(4, generator=GEN)}
    tgt = {"cls": torch.tensor([0, 1, 2, -1]), "reg": torch.tensor([0.0, 1.0, float("nan"), 2])}
    values = tasks.losses(out, tgt)
    assert all(torch.isfinite(v) for v in values)
    split = SplitMetrics(tasks)
    split.update(out, tgt)
    assert set(split.compute()) == {"cls/acc", "reg/mae"}
    with pytest.raises(KeyError, match=r"targets has no entry for task\(s\) \['reg'\]"):
        tasks.losses(out, {"cls": tgt["cls"]})
    with pytest.raises(ValueError, match="distinct"):
        TaskSet([Task("a", losses.mse), Task("a", losses.mse)])


def test_undefined_values_are_nan_not_zero():
    one_class = AUC()
    one_class.update(torch.randn(5, generator=GEN), torch.ones(5))
    assert math.isnan(one_class.compute()["auc"])
    unlabelled = MeanError("mae")
    unlabelled.update(torch.randn(3, generator=GEN), torch.full((3,), float("nan")))
    assert math.isnan(unlabelled.compute()["mae"])
    acc = Accuracy(3)
    acc.update(torch.randn(2, 3, generator=GEN), torch.tensor([-1, -1]))
    assert math.isnan(acc.compute()["acc"])
