"""Losses skip missing labels and stay connected to the prediction when a batch has none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytask.tasks import losses

GEN = torch.Generator().manual_seed(0)


def test_cross_entropy_skips_ignore_index():
    logits = torch.randn(5, 3, generator=GEN)
    target = torch.tensor([0, -1, 2, 1, -1])
    keep = target != -1
    expected = F.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(losses.cross_entropy(logits, target), expected)


@pytest.mark.parametrize(
    ("fn", "ref"),
    [
        (losses.mse, lambda p, t: ((p - t) ** 2).mean()),
        (losses.l1, lambda p, t: (p - t).abs().mean()),
        (losses.bce_with_logits, F.binary_cross_entropy_with_logits),
    ],
)
def test_float_losses_skip_nan_targets(fn, ref):
    pred = torch.randn(6, generator=GEN)
    target = torch.rand(6, generator=GEN).round()
    target[[1, 4]] = float("nan")
    keep = ~torch.isnan(target)
    torch.testing.assert_close(fn(pred, target), ref(pred[keep], target[keep]))


def test_no_labels_gives_a_connected_zero():
    pred = torch.randn(4, 3, requires_grad=True)
    for value in (
        losses.cross_entropy(pred, torch.full((4,), -1)),
        losses.mse(pred[:, 0], torch.full((4,), float("nan"))),
        losses.depth_l1(pred.view(4, 3, 1, 1)[:, :1], torch.zeros(4, 1, 1, 1)),
    ):
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, pred)
        assert torch.equal(grad, torch.zeros_like(pred))


def test_depth_and_normal_losses_on_labelled_pixels():
    pred = torch.tensor([[[[1.0, 5.0]]]])
    gt = torch.tensor([[[[2.0, 0.0]]]])
    assert losses.depth_l1(pred, gt).item() == 1.0
    n_pred = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]], [[1.0, 3.0]]]).unsqueeze(0)  # [1,3,1,2]
    n_gt = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]]]).unsqueeze(0)
    # pixel 0: pred (1,0,1)/sqrt2 vs (0,0,1): cos = 1/sqrt2; pixel 1 unlabelled.
    expected = 1 - 2**-0.5
    torch.testing.assert_close(losses.normal_cosine(n_pred, n_gt), torch.tensor(expected))


def test_has_labels():
    assert not losses.has_labels(torch.full((3,), -1))
    assert losses.has_labels(torch.tensor([float("nan"), 1.0]))
    assert not losses.has_labels(torch.zeros(1, 1, 2, 2), kind="depth")
    assert not losses.has_labels(torch.zeros(1, 3, 2, 2), kind="normals")
    with pytest.raises(ValueError, match="kind="):
        losses.has_labels(torch.zeros(1), kind="bad")
