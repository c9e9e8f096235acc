"""DTP (Guo et al., ECCV 2018): focal task weights of the moving-average KPIs."""

from __future__ import annotations

import io
import math

import pytest
import torch

import polytask
from polytask.errors import InvalidContextError, InvalidHyperparameterError, MissingContextError

from ._helpers import assert_weighted_shared_grad, linear_problem


def step(method, kpis, values=None):
    k = method.num_tasks
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    losses = torch.tensor(values or [1.0] * k, dtype=torch.float64) + 0.0 * p
    return method.backward(losses, shared_params=[p], kpis=kpis).weights


def focal(kappa: float, gamma: float) -> float:
    return -((1 - kappa) ** gamma) * math.log(kappa)


def test_hand_computed_weights():
    kpis = [0.2, 0.5, 0.9]
    w = step(polytask.methods.create("dtp", 3), torch.tensor(kpis))
    # gamma = 1: w = -(1 - k) log k
    expected = [0.8 * -math.log(0.2), 0.5 * -math.log(0.5), 0.1 * -math.log(0.9)]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    assert w[0] > w[1] > w[2]  # the hardest task first


def test_per_task_gamma():
    kpis, gammas = [0.3, 0.3, 0.6], [0.0, 2.0, 0.5]
    w = step(polytask.methods.create("dtp", 3, gamma=gammas), kpis)
    expected = [focal(k, g) for k, g in zip(kpis, gammas)]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))


def test_moving_average_of_the_kpis():
    alpha = 0.7
    method = polytask.methods.create("dtp", 2, alpha=alpha, gamma=2.0)
    sequence = [[0.2, 0.9], [0.4, 0.8], [0.8, 0.1]]
    kbar = None
    for kpis in sequence:
        kbar = kpis if kbar is None else [alpha * k + (1 - alpha) * b for k, b in zip(kpis, kbar)]
        w = step(method, kpis)
        torch.testing.assert_close(
            w, torch.tensor([focal(b, 2.0) for b in kbar], dtype=torch.float64)
        )
    torch.testing.assert_close(method.kpi_average, torch.tensor(kbar, dtype=torch.float64))


def test_alpha_one_uses_the_latest_kpi():
    method = polytask.methods.create("dtp", 2, alpha=1.0)
    step(method, [0.1, 0.1])
    w = step(method, [0.6, 0.3])
    torch.testing.assert_close(w, torch.tensor([focal(0.6, 1), focal(0.3, 1)], dtype=torch.float64))


def test_perfect_kpi_gets_zero_weight_and_lower_kpi_more_weight():
    kpis = torch.linspace(0.05, 1.0, 20)
    w = step(polytask.methods.create("dtp", 20, gamma=2.0), kpis)
    assert float(w[-1]) == 0.0
    assert bool((w[:-1] > w[1:]).all())


def test_backward_weights_the_encoder_and_heads():
    problem = linear_problem(3, seed=5)
    method = polytask.methods.create("dtp", 3)
    losses, _ = problem.forward()
    result = method.backward(losses, shared_params=problem.shared(), kpis=[0.3, 0.6, 0.95])
    assert_weighted_shared_grad(problem, result.weights)


def test_missing_kpis_is_an_error():
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(MissingContextError, match="kpis"):
        polytask.methods.create("dtp", 2).backward(p.repeat(2) + 1.0, shared_params=[p])


def test_out_of_range_kpis_are_an_error():
    with pytest.raises(InvalidContextError, match=r"kpis=.*\[0.0, 1.0\]"):
        step(polytask.methods.create("dtp", 2), [0.5, 1.5])


def test_zero_smoothed_kpi_is_an_error():
    method = polytask.methods.create("dtp", 2)
    with pytest.raises(InvalidContextError, match=r"task\(s\) \[1\] is 0"):
        step(method, [0.5, 0.0])
    assert method.kpi_updates == 0  # the failed step left the state untouched


def test_state_dict_round_trip():
    original = polytask.methods.create("dtp", 3, alpha=0.5)
    step(original, [0.2, 0.4, 0.6])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("dtp", 3, alpha=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.kpi_updates == 1
    torch.testing.assert_close(step(restored, [0.9, 0.1, 0.5]), step(original, [0.9, 0.1, 0.5]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": [1.0, 2.0, 3.0]}, "gamma"),
        # Not numbers: the error names the value instead of a bare TypeError/ValueError.
        ({"gamma": True}, "gamma=True"),
        ({"gamma": "ab"}, "gamma='ab'"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("dtp", 2, **kwargs)
