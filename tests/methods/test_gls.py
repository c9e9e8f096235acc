"""GLS (Chennupati et al., CVPRW 2019): the gradient of the geometric mean of the losses."""

from __future__ import annotations

import pytest
import torch

import polytask
from polytask.errors import InvalidLossesError

from ._helpers import assert_weighted_shared_grad, linear_problem


@pytest.mark.parametrize("k", [1, 2, 5])
def test_update_is_the_gradient_of_the_product_root(k):
    """Our backward equals autograd of (prod_k L_k)^(1/K) (the product rule), heads included."""
    problem = linear_problem(k, seed=k)
    losses, _ = problem.forward()
    expected = torch.autograd.grad(losses.prod() ** (1.0 / k), problem.parameters())
    result = problem.backward(polytask.methods.create("gls", k))
    for p, g in zip(problem.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert_weighted_shared_grad(problem, result.weights)


def test_hand_computed_weights():
    """L = (1, 4): G = 2, w = G / (K L) = (1, 1/4)."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    losses = torch.tensor([1.0, 4.0], dtype=torch.float64) + 0.0 * p
    total, weights = polytask.methods.create("gls", 2).objective(losses)
    assert float(total.detach()) == pytest.approx(2.0, rel=1e-15)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_weights_are_the_partial_derivatives_of_the_geometric_mean():
    values = torch.tensor([0.3, 2.0, 7.0, 1.1], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(values.prod() ** 0.25, values)
    _, weights = polytask.methods.create("gls", 4).objective(values)
    torch.testing.assert_close(weights, grad, rtol=1e-14, atol=0)


def test_rescaling_one_loss_rescales_the_update_by_its_kth_root():
    k, c = 3, 50.0
    problem = linear_problem(k, seed=7)
    method = polytask.methods.create("gls", k)
    losses, _ = problem.forward()
    method.backward(losses, shared_params=problem.shared())
    base = problem.shared_grad().clone()
    problem.zero_grad()
    losses, _ = problem.forward()
    method.backward(
        losses * torch.tensor([c, 1.0, 1.0], dtype=losses.dtype), shared_params=problem.shared()
    )
    torch.testing.assert_close(problem.shared_grad(), c ** (1 / k) * base, rtol=1e-10, atol=0)


def test_many_small_losses_do_not_underflow():
    """40 losses of 1e-10: the product (1e-400) underflows float64, the geometric mean does not."""
    k = 40
    p = torch.ones(1, dtype=torch.float64, requires_grad=True)
    losses = 1e-10 * p.repeat(k)
    assert float(losses.detach().prod()) == 0.0
    result = polytask.methods.create("gls", k).backward(losses, shared_params=[p])
    # G = 1e-10, w_k = G / (K L_k) = 1 / K, dG/dp = sum_k w_k 1e-10 = 1e-10.
    torch.testing.assert_close(result.weights, torch.full((k,), 1 / k, dtype=torch.float64))
    torch.testing.assert_close(p.grad, torch.tensor([1e-10], dtype=torch.float64))


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_is_an_error_naming_the_task(bad):
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    losses = torch.tensor([1.0, bad, 2.0], dtype=torch.float64) + 0.0 * p
    with pytest.raises(InvalidLossesError, match=f"task 1 = {bad}"):
        polytask.methods.create("gls", 3).backward(losses, shared_params=[p])
