"""Deep-AMTFL's asymmetric transfer term (Lee, Yang & Hwang, ICML 2018), by hand."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import PolytaskError
from polytask.regularizers import DeepAMTFL


def make() -> DeepAMTFL:
    reg = DeepAMTFL(2, 3, alpha=0.5, gamma=2.0)
    with torch.no_grad():
        reg.transfer.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 2.0]]))
    return reg


def test_value_by_hand():
    reg = make()
    losses = torch.tensor([0.4, 2.0])
    outputs = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # l1 rows: 2 and 3 -> 0.5 * (2 * 0.4 + 3 * 2) = 3.4
    # ReLU(Y A): row 1 = ReLU([1, -1, 0]) = [1, 0, 0]; row 2 = ReLU([-.5, -.5, -2]) = 0
    # residual: [0, 0, 0] and [0, 0, 1] -> 2 * 1 = 2
    assert reg(losses, outputs, features).item() == pytest.approx(5.4)


def test_loss_weighting_is_one_plus_alpha_times_the_outgoing_transfer():
    reg = make()
    torch.testing.assert_close(reg.task_weights(), torch.tensor([2.0, 2.5]))
    losses = torch.tensor([0.4, 2.0], requires_grad=True)
    total = losses.sum() + reg(losses, torch.zeros(1, 2), torch.zeros(1, 3))
    (grad,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(grad, reg.task_weights())


def test_shapes_are_checked():
    reg = make()
    with pytest.raises(PolytaskError, match=r"\[2\] task losses"):
        reg(torch.zeros(3), torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(PolytaskError, match="features"):
        reg(torch.zeros(2), torch.zeros(1, 2), torch.zeros(1, 4))
