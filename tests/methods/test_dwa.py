"""DWA (Liu, Johns & Davison, CVPR 2019): epoch averages, the loss-ratio softmax, state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import InvalidContextError, InvalidLossesError, MissingContextError

from ._helpers import assert_weighted_shared_grad, epoch_step, linear_problem

# Per-step losses of three epochs (K = 3, three steps each) and the step of epoch 3.
EPOCHS = [
    [[2.0, 1.0, 4.0], [1.6, 0.8, 3.8], [1.2, 0.9, 4.2]],
    [[1.0, 0.7, 3.9], [0.9, 0.5, 4.1], [0.8, 0.6, 3.6]],
    [[0.5, 0.5, 3.5], [0.7, 0.3, 3.4], [0.3, 0.4, 3.3]],
]


step = epoch_step


def hand_weights(avg_prev: np.ndarray, avg_prev2: np.ndarray, temperature: float) -> np.ndarray:
    """DWA: w_k = K exp(r_k / T) / sum_i exp(r_i / T), r_k = L_k(t-1) / L_k(t-2)."""
    r = avg_prev / avg_prev2
    e = np.exp(r / temperature)
    return len(r) * e / e.sum()


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_weights_follow_the_loss_ratio_softmax(temperature):
    method = polytask.methods.create("dwa", 3, temperature=temperature)
    seen = []
    for epoch, steps in enumerate(EPOCHS):
        seen.append([step(method, values, epoch) for values in steps])
    w3 = step(method, [0.1, 0.1, 0.1], 3)
    averages = [np.mean(steps, axis=0) for steps in EPOCHS]
    # Epochs 0 and 1: no ratio yet, w = 1.
    for w in seen[0] + seen[1]:
        np.testing.assert_array_equal(w.numpy(), np.ones(3))
    # Epoch 2 uses epochs 1 and 0; the weights stay fixed within the epoch.
    expected2 = hand_weights(averages[1], averages[0], temperature)
    for w in seen[2]:
        np.testing.assert_allclose(w.numpy(), expected2, rtol=1e-12)
    # Epoch 3 uses epochs 2 and 1.
    np.testing.assert_allclose(w3.numpy(), hand_weights(averages[2], averages[1], temperature))
    assert float(w3.sum()) == pytest.approx(3.0, rel=1e-12)


def test_hand_computed_two_task_case():
    """L_1 halves, L_2 stays: r = (0.5, 1), w_1 = 2 e^{0.25} / (e^{0.25} + e^{0.5})."""
    method = polytask.methods.create("dwa", 2)
    step(method, [4.0, 1.0], 0)
    step(method, [2.0, 1.0], 1)
    w = step(method, [1.0, 1.0], 2)
    e1, e2 = np.exp(0.25), np.exp(0.5)
    np.testing.assert_allclose(w.numpy(), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)], rtol=1e-14)
    assert w[1] > 1 > w[0]  # the task whose loss did not fall gets more weight


def test_large_temperature_tends_to_equal_weights():
    method = polytask.methods.create("dwa", 3, temperature=1e6)
    for epoch, steps in enumerate(EPOCHS):
        for values in steps:
            w = step(method, values, epoch)
    np.testing.assert_allclose(w.numpy(), np.ones(3), atol=1e-6)


def test_backward_weights_the_encoder_and_heads():
    problem = linear_problem(2, seed=2)
    method = polytask.methods.create("dwa", 2)
    opt = torch.optim.SGD(problem.parameters(), lr=0.05)
    for epoch in range(3):
        problem.zero_grad()
        losses, _ = problem.forward()
        result = method.backward(losses, shared_params=problem.shared(), epoch=epoch)
        opt.step()
    problem.zero_grad()
    losses, _ = problem.forward()
    result = method.backward(losses, shared_params=problem.shared(), epoch=3)
    assert not torch.allclose(result.weights, torch.ones(2, dtype=torch.float64))
    assert_weighted_shared_grad(problem, result.weights)


def test_skipped_epochs_compare_the_two_latest_epochs_with_steps():
    method = polytask.methods.create("dwa", 2)
    step(method, [4.0, 1.0], 0)
    step(method, [2.0, 1.0], 3)
    w = step(method, [1.0, 1.0], 7)
    reference = polytask.methods.create("dwa", 2)
    for epoch, values in enumerate([[4.0, 1.0], [2.0, 1.0], [1.0, 1.0]]):
        expected = step(reference, values, epoch)
    torch.testing.assert_close(w, expected)


def test_state_dict_round_trip_mid_epoch():
    original = polytask.methods.create("dwa", 3)
    for epoch, steps in enumerate(EPOCHS[:2]):
        for values in steps:
            step(original, values, epoch)
    step(original, EPOCHS[2][0], 2)  # part of epoch 2
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("dwa", 3)
    restored.load_state_dict(torch.load(buffer))
    for values in [*EPOCHS[2][1:], [1.0, 1.0, 1.0]]:
        epoch = 2 if values in EPOCHS[2] else 3
        torch.testing.assert_close(step(restored, values, epoch), step(original, values, epoch))
    assert not torch.equal(restored.task_weights, torch.ones(3, dtype=torch.float64))


def test_missing_epoch_is_an_error():
    p = torch.zeros(1, requires_grad=True)
    method = polytask.methods.create("dwa", 2)
    with pytest.raises(MissingContextError, match="epoch"):
        method.backward(p.repeat(2) + 1.0, shared_params=[p])


def test_decreasing_epoch_is_an_error():
    method = polytask.methods.create("dwa", 2)
    step(method, [1.0, 1.0], 3)
    with pytest.raises(InvalidContextError, match="epoch=2 is earlier"):
        step(method, [1.0, 1.0], 2)


def test_non_positive_average_loss_is_an_error():
    method = polytask.methods.create("dwa", 2)
    step(method, [1.0, -1.0], 0)
    with pytest.raises(InvalidLossesError, match=r"task\(s\) \[1\]"):
        step(method, [1.0, 1.0], 1)
    assert method.history.completed == 0 and method.history.epoch == 0  # state untouched


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "2"])
def test_invalid_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        polytask.methods.create("dwa", 2, temperature=bad)
