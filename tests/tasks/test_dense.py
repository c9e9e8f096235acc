"""Losses and metrics of :mod:`polytask.tasks.dense` (Vandenhende et al.'s PASCAL-Context)."""

import math

import pytest
import torch

from polytask.tasks import dense


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _their_balanced_bce(output, label, pos_weight=None):
    """BalancedCrossEntropyLoss.forward of Vandenhende et al.'s losses/loss_functions.py
    (size_average=True, no void pixels), transcribed as the reference."""
    labels = torch.ge(label, 0.5).float()
    if pos_weight is None:
        w = torch.sum(1.0 - labels) / labels.numel()
    else:
        w = pos_weight
    gt0 = torch.ge(output, 0).float()
    loss_val = output * (labels - gt0) - torch.log(1 + torch.exp(output - 2 * output * gt0))
    pos = torch.sum(-labels * loss_val)
    neg = torch.sum(-(1.0 - labels) * loss_val)
    return (w * pos + (1 - w) * neg) / label.numel()


def test_balanced_bce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    pos = _softplus(0.0) + _softplus(-2.0)  # -log sigmoid(x) of the positives
    neg = _softplus(-1.0) + _softplus(0.0)  # -log(1 - sigmoid(x)) of the negatives
    # HED's weight: half the pixels are negative.
    assert float(dense.balanced_bce(logits, target)) == pytest.approx((0.5 * pos + 0.5 * neg) / 4)
    fixed = dense.balanced_bce(logits, target, pos_weight=0.95)
    assert float(fixed) == pytest.approx((0.95 * pos + 0.05 * neg) / 4)


@pytest.mark.parametrize("pos_weight", [None, 0.95])
def test_balanced_bce_matches_their_loss(pos_weight):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 6, generator=g) * 3
    target = (torch.rand(2, 1, 5, 6, generator=g) > 0.7).float()
    ours = dense.balanced_bce(logits, target, pos_weight=pos_weight)
    theirs = _their_balanced_bce(logits, target, pos_weight)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_balanced_bce_skips_nan_and_is_zero_without_labels():
    logits = torch.tensor([[1.0, -3.0, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan"), 0.0]])
    loss = dense.balanced_bce(logits, target, pos_weight=0.5)
    assert float(loss.detach()) == pytest.approx((0.5 * _softplus(-1.0) + 0.5 * _softplus(0.5)) / 2)
    empty = dense.balanced_bce(logits, torch.full((1, 3), float("nan")))
    empty.backward()
    assert float(empty.detach()) == 0.0 and logits.grad is not None
    with pytest.raises(ValueError, match="pos_weight"):
        dense.balanced_bce(logits, target, pos_weight=1.5)


def test_normals_l1_by_hand():
    pred = torch.zeros(1, 3, 1, 3)
    target = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])  # normalised: exactly the target
    target[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    pred[0, :, 0, 1] = torch.tensor([0.0, 3.0, 4.0])  # (0, 0.6, 0.8) vs (0, 0, 1): 0.8
    target[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    pred[0, :, 0, 2] = torch.tensor([5.0, 5.0, 5.0])  # unlabelled pixel: skipped
    loss = dense.normals_l1(pred, target)
    assert float(loss) == pytest.approx(0.8 / 6, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        dense.normals_l1(pred[:, :2], target[:, :2])


def test_saliency_max_f_averages_precision_and_recall_over_images():
    # Image 1: one salient pixel, probabilities 0.95, 0.62, 0.1, 0.1. Image 2: nothing
    # salient, nothing predicted (IoU 1, precision = recall = 0, as their jaccard).
    probs = torch.tensor([[0.95, 0.62], [0.1, 0.1]])
    logits = torch.stack([torch.logit(probs), torch.logit(torch.full((2, 2), 0.1))])[:, None]
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    # tau <= 0.6: image 1 has P 1/2, R 1, IoU 1/2 -> mean P 1/4, R 1/2, IoU 3/4, F 1/3.
    # tau >= 0.65: image 1 has P = R = IoU = 1 -> mean P 1/2, R 1/2, IoU 1, F 1/2.
    metric = dense.SaliencyMaxF()
    metric.update(logits, target)
    out = metric.compute()
    assert out["max_f"] == pytest.approx(0.5) and out["miou"] == pytest.approx(1.0)
    one_by_one = dense.SaliencyMaxF()
    for i in range(2):
        one_by_one.update(logits[i : i + 1], target[i : i + 1])
    assert one_by_one.compute() == pytest.approx(out)
    assert metric.directions == {"max_f": True, "miou": True}
    assert dense.SALIENCY_THRESHOLDS[0] == 0.2 and dense.SALIENCY_THRESHOLDS[-1] == 0.9
    assert len(dense.SALIENCY_THRESHOLDS) == 15


def test_edge_loss_metric_is_the_per_pixel_mean_over_the_split():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 2, 4, generator=g)
    ta = (torch.rand(1, 1, 4, 4, generator=g) > 0.5).float()
    tb = (torch.rand(1, 1, 2, 4, generator=g) > 0.5).float()
    metric = dense.BalancedBCELoss(0.95)
    metric.update(a, ta)
    metric.update(b, tb)
    la = float(dense.balanced_bce(a, ta, pos_weight=0.95))
    lb = float(dense.balanced_bce(b, tb, pos_weight=0.95))
    assert metric.compute()["loss"] == pytest.approx((16 * la + 8 * lb) / 24)
    assert metric.directions == {"loss": False}
