"""UW (Kendall, Gal & Cipolla, CVPR 2018): the likelihood objective, its fixed point, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError

from ._helpers import assert_weighted_shared_grad, linear_problem


def constant_losses(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses with the given values that depend on a dummy parameter (gradient 0)."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    return torch.tensor(values, dtype=torch.float64) + 0.0 * p, p


def test_papers_two_task_objective():
    """Regression + classification: 1/(2 s1^2) L_1 + 1/s2^2 L_2 + log s1 + log s2 (sigmas)."""
    sigma = [0.7, 1.8]
    method = polytask.methods.create(
        "uw",
        2,
        task_types=["regression", "classification"],
        init_log_variance=[math.log(s**2) for s in sigma],
    )
    l1, l2 = 2.5, 0.4
    losses, _ = constant_losses([l1, l2])
    total, weights = method.objective(losses)
    expected = l1 / (2 * sigma[0] ** 2) + l2 / sigma[1] ** 2 + math.log(sigma[0] * sigma[1])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(
        weights, torch.tensor([1 / (2 * sigma[0] ** 2), 1 / sigma[1] ** 2], dtype=torch.float64)
    )


def test_log_variance_gradient():
    """d/ds_k [c_k e^{-s_k} L_k + s_k / 2] = 1/2 - c_k e^{-s_k} L_k, accumulated by backward."""
    s0 = [0.3, -0.2, 1.1]
    method = polytask.methods.create(
        "uw", 3, task_types=["regression", "classification", "regression"], init_log_variance=s0
    )
    values = [1.5, 0.2, 3.0]
    losses, p = constant_losses(values)
    method.backward(losses, shared_params=[p])
    c = [0.5, 1.0, 0.5]
    expected = [0.5 - ck * math.exp(-sk) * lk for ck, sk, lk in zip(c, s0, values)]
    torch.testing.assert_close(method.log_variance.grad, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("task_type", "fixed_point"),
    [
        # 1/2 - (1/2) e^{-s} L = 0  =>  s = log L
        ("regression", lambda loss: math.log(loss)),
        # 1/2 - e^{-s} L = 0  =>  s = log(2 L)
        ("classification", lambda loss: math.log(2 * loss)),
    ],
)
def test_gradient_descent_on_s_reaches_the_fixed_point(task_type, fixed_point):
    values = [0.05, 1.0, 7.5]
    method = polytask.methods.create("uw", 3, task_types=task_type)
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        losses, p = constant_losses(values)
        result = method.backward(losses, shared_params=[p])
        opt.step()
    expected = torch.tensor([fixed_point(v) for v in values])
    torch.testing.assert_close(method.log_variance.detach(), expected, rtol=0, atol=1e-5)
    # At the fixed point every effective weight is 1 / (2 L_k), in both forms.
    torch.testing.assert_close(
        result.weights, 1 / (2 * torch.tensor(values, dtype=torch.float64)), rtol=1e-4, atol=0
    )


def test_mixed_forms_reach_their_own_fixed_points():
    values = [0.3, 0.3]
    method = polytask.methods.create("uw", 2, task_types=["regression", "classification"])
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        losses, p = constant_losses(values)
        method.backward(losses, shared_params=[p])
        opt.step()
    expected = torch.tensor([math.log(0.3), math.log(0.6)])
    torch.testing.assert_close(method.log_variance.detach(), expected, rtol=0, atol=1e-5)


def test_backward_weights_the_encoder_and_heads():
    problem = linear_problem(3, seed=4)
    method = polytask.methods.create("uw", 3, init_log_variance=[0.0, 1.0, -1.0])
    result = problem.backward(method)
    expected = 0.5 * torch.exp(-torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(result.weights, expected)
    assert_weighted_shared_grad(problem, expected)


def test_default_is_the_regression_form_at_sigma_one():
    method = polytask.methods.create("uw", 2)
    losses, _ = constant_losses([1.0, 2.0])
    total, weights = method.objective(losses)
    torch.testing.assert_close(weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert float(total.detach()) == pytest.approx(1.5)


def test_state_dict_round_trip_restores_the_log_variances():
    method = polytask.methods.create("uw", 3, task_types="classification")
    with torch.no_grad():
        method.log_variance.copy_(torch.tensor([0.4, -1.2, 2.0]))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("uw", 3, task_types="classification")
    restored.load_state_dict(torch.load(buffer))
    losses, _ = constant_losses([1.0, 2.0, 3.0])
    torch.testing.assert_close(restored.objective(losses)[1], method.objective(losses)[1])
    assert [name for name, _ in restored.named_parameters()] == ["log_variance"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task_types": ["regression"]}, "task_types has 1 entries"),
        ({"task_types": "poisson"}, "poisson"),
        ({"init_log_variance": [0.0]}, "init_log_variance"),
        ({"init_log_variance": float("nan")}, "init_log_variance"),
        # Not numbers: the error names the value instead of a bare TypeError/ValueError.
        ({"init_log_variance": True}, "init_log_variance=True"),
        ({"init_log_variance": "ab"}, "init_log_variance='ab'"),
        ({"task_types": 3}, "task_types=3"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("uw", 2, **kwargs)
