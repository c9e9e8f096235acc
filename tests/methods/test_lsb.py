"""LSB (Lee, Lee & Kim, ICCV 2021): balanced loss scales, difficulty, epoch state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import InvalidContextError, InvalidLossesError, MissingContextError

from ._helpers import assert_weighted_shared_grad, epoch_step, linear_problem

EPOCHS = [
    [[2.0, 1.0, 40.0], [1.6, 0.8, 38.0], [1.2, 0.9, 42.0]],
    [[1.0, 0.7, 39.0], [0.9, 0.5, 41.0], [0.8, 0.6, 36.0]],
    [[0.5, 0.5, 35.0], [0.7, 0.3, 34.0], [0.3, 0.4, 33.0]],
]


step = epoch_step


def run(method):
    """Weights of every step of EPOCHS, then of one step of epoch 3."""
    out = [[step(method, v, e).numpy() for v in steps] for e, steps in enumerate(EPOCHS)]
    return out, step(method, [1.0, 1.0, 1.0], 3).numpy()


def hand_weights(beta: float) -> list[np.ndarray]:
    """w(t) for t = 0..3 from the formulas of the docstring, in plain numpy."""
    k = 3
    avg = [np.mean(s, axis=0) for s in EPOCHS]
    w = [np.ones(k)]
    overall = []
    for t in range(1, 4):
        overall.append(float(w[t - 1] @ avg[t - 1]))  # average objective of epoch t-1
        lam = overall[-1] / (k * avg[t - 1])
        if t >= 2:
            ratio = (avg[t - 1] / avg[t - 2]) / (overall[-1] / overall[-2])
            lam = lam * ratio**beta
        w.append(lam)
    return w


@pytest.mark.parametrize("beta", [1.0, 0.0, 2.5])
def test_weights_match_the_hand_computed_rule(beta):
    seen, last = run(polytask.methods.create("lsb", 3, beta=beta))
    expected = hand_weights(beta)
    for t, steps in enumerate(seen):
        for w in steps:  # fixed within an epoch
            np.testing.assert_allclose(w, expected[t], rtol=1e-12)
    np.testing.assert_allclose(last, expected[3], rtol=1e-12)


def test_balancing_equalises_the_loss_scales_and_keeps_their_sum():
    """beta = 0: w_k(t) Lbar_k(t-1) is the same for every task and sums to Lbar(t-1)."""
    seen, last = run(polytask.methods.create("lsb", 3, beta=0.0))
    avg = [np.mean(s, axis=0) for s in EPOCHS]
    weights = [steps[0] for steps in seen] + [last]
    for t in range(1, 4):
        scales = weights[t] * avg[t - 1]
        np.testing.assert_allclose(scales, np.full(3, scales.mean()), rtol=1e-12)
        np.testing.assert_allclose(scales.sum(), weights[t - 1] @ avg[t - 1], rtol=1e-12)


def test_difficulty_favours_the_task_whose_loss_falls_slowest():
    method = polytask.methods.create("lsb", 2)
    step(method, [1.0, 1.0], 0)
    step(method, [1.0, 1.0], 1)
    w = step(method, [1.0, 1.0], 2)
    np.testing.assert_allclose(w.numpy(), [1.0, 1.0])  # equal progress: EW kept
    # Task 0 halves in epoch 1, task 1 stalls: overall 2 -> 1.5, balancing alone gives
    # lambda = 1.5 / (2 (0.5, 1)) = (1.5, 0.75); difficulty d = ((0.5, 1) / 0.75) = (2/3, 4/3)
    # moves weight back to the stalled task: w = (1, 1).
    method = polytask.methods.create("lsb", 2)
    step(method, [1.0, 1.0], 0)
    step(method, [0.5, 1.0], 1)
    np.testing.assert_allclose(step(method, [1.0, 1.0], 2).numpy(), [1.0, 1.0], rtol=1e-14)
    balanced = polytask.methods.create("lsb", 2, beta=0.0)
    for e, v in enumerate([[1.0, 1.0], [0.5, 1.0], [1.0, 1.0]]):
        wb = step(balanced, v, e)
    np.testing.assert_allclose(wb.numpy(), [1.5, 0.75], rtol=1e-14)


def test_backward_weights_the_encoder_and_heads():
    problem = linear_problem(2, seed=3)
    method = polytask.methods.create("lsb", 2)
    opt = torch.optim.SGD(problem.parameters(), lr=0.05)
    for epoch in range(3):
        problem.zero_grad()
        losses, _ = problem.forward()
        method.backward(losses, shared_params=problem.shared(), epoch=epoch)
        opt.step()
    problem.zero_grad()
    losses, _ = problem.forward()
    result = method.backward(losses, shared_params=problem.shared(), epoch=3)
    assert not torch.allclose(result.weights, torch.ones(2, dtype=torch.float64))
    assert_weighted_shared_grad(problem, result.weights)


def test_state_dict_round_trip_mid_epoch():
    original = polytask.methods.create("lsb", 3)
    for epoch, steps in enumerate(EPOCHS[:2]):
        for values in steps:
            step(original, values, epoch)
    step(original, EPOCHS[2][0], 2)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("lsb", 3)
    restored.load_state_dict(torch.load(buffer))
    for values in EPOCHS[2][1:]:
        torch.testing.assert_close(step(restored, values, 2), step(original, values, 2))
    torch.testing.assert_close(step(restored, [1.0] * 3, 3), step(original, [1.0] * 3, 3))


def test_missing_or_decreasing_epoch_is_an_error():
    method = polytask.methods.create("lsb", 2)
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(MissingContextError, match="epoch"):
        method.backward(p.repeat(2) + 1.0, shared_params=[p])
    step(method, [1.0, 1.0], 1)
    with pytest.raises(InvalidContextError, match="epoch=0 is earlier"):
        step(method, [1.0, 1.0], 0)


def test_zero_average_loss_is_an_error():
    method = polytask.methods.create("lsb", 2)
    step(method, [0.0, 1.0], 0)
    with pytest.raises(InvalidLossesError, match=r"LSB needs positive task losses.*\[0\]"):
        step(method, [1.0, 1.0], 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1"])
def test_invalid_beta(bad):
    with pytest.raises(ValueError, match="beta"):
        polytask.methods.create("lsb", 2, beta=bad)
