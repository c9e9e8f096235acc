"""AW (He et al., ACM MM 2017): the validation-loss-trend weights against the authors' layer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import (
    InvalidContextError,
    InvalidHyperparameterError,
    MissingContextError,
    NonFiniteError,
)

from ._helpers import tiny_problem


class _AuthorsLayer:
    """The weights of the authors' TrainValWeightedEuclideanLossLayer.backward
    (github.com/qiexing/adaptive_weighted_attribute, python_loss_layer.py), re-written in
    numpy for the test: every validation loss kept in a list, windows sliced from it."""

    def __init__(self, k: int, interval: int) -> None:
        self.interval, self.count = interval, 0
        self.val_loss: list[np.ndarray] = []
        self.norm_trend, self.norm_loss = np.ones(k), np.ones(k)

    def step(self, val: np.ndarray) -> np.ndarray:
        self.val_loss.append(val)  # forward
        self.count += 1
        if self.count == self.interval:
            self.pre_val_mean = np.mean(self.val_loss[0 : self.interval], axis=0)
        if self.count >= 2 * self.interval and self.count % self.interval == 0:
            cur = np.mean(self.val_loss[self.count - self.interval : self.count], axis=0)
            trend = abs(cur - self.pre_val_mean) / cur
            self.norm_trend = trend / np.mean(trend)
            self.norm_loss = cur / np.mean(cur)
            self.pre_val_mean = cur
        weights = self.norm_trend * self.norm_loss
        return weights / np.mean(weights)


@pytest.mark.parametrize("interval", [1, 3])
def test_weights_follow_the_authors_layer(interval):
    k = 3
    gen = np.random.default_rng(interval)
    problem = tiny_problem(k)
    method = polytask.methods.create("aw", k, interval=interval)
    ref = _AuthorsLayer(k, interval)
    for t in range(4 * interval + 2):
        val = np.exp(gen.normal(size=k)) * (1.0 - 0.05 * t)
        problem.zero_grad()
        losses, _ = problem.forward()
        head_grads = [
            torch.autograd.grad(losses[i], list(h.parameters()), retain_graph=True)
            for i, h in enumerate(problem.heads)
        ]
        result = method.backward(
            losses, shared_params=problem.shared(), val_losses=torch.from_numpy(val)
        )
        expected = torch.from_numpy(ref.step(val))
        torch.testing.assert_close(result.weights, expected, rtol=1e-12, atol=0)
        for w, head, grads in zip(expected, problem.heads, head_grads):
            for p, g in zip(head.parameters(), grads):
                torch.testing.assert_close(p.grad, w * g)
    assert not torch.allclose(result.weights, torch.ones(k, dtype=torch.float64))


def test_weights_by_hand():
    # interval 1. Step 1: m' = (1, 2). Step 2: m = (0.5, 2.5): trend = (1, 0.2),
    # trend / mean = (5/3, 1/3); m / mean(m) = (1/3, 5/3); a = (5/9, 5/9): w = (1, 1).
    # Step 3: m = (0.25, 2.5): trend = (1, 0) -> (2, 0); m / mean = (2/11, 20/11); w = (2, 0).
    method = polytask.methods.create("aw", 2, interval=1)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    out = [
        method.backward(x + 1.0, shared_params=[x], val_losses=torch.tensor(v)).weights
        for v in ([1.0, 2.0], [0.5, 2.5], [0.25, 2.5])
    ]
    one = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(out[0], one)
    torch.testing.assert_close(out[1], one)
    torch.testing.assert_close(out[2], torch.tensor([2.0, 0.0], dtype=torch.float64))
    # One evaluation every 2 steps, repeated in between, with interval=2: the same weights,
    # from the changes between consecutive evaluations, at the end of each window.
    method = polytask.methods.create("aw", 2, interval=2)
    out = [
        method.backward(x + 1.0, shared_params=[x], val_losses=torch.tensor(v)).weights
        for v in ([1.0, 2.0], [1.0, 2.0], [0.5, 2.5], [0.5, 2.5], [0.25, 2.5], [0.25, 2.5])
    ]
    torch.testing.assert_close(out[3], one)
    torch.testing.assert_close(out[4], one)
    torch.testing.assert_close(out[5], torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_flat_validation_losses_are_an_error():
    method = polytask.methods.create("aw", 2, interval=2)
    x = torch.zeros(2, requires_grad=True)
    val = torch.tensor([1.0, 2.0])
    for _ in range(3):
        method.backward(x + 1.0, shared_params=[x], val_losses=val)
    with pytest.raises(NonFiniteError, match="interval="):
        method.backward(x + 1.0, shared_params=[x], val_losses=val)


def test_needs_positive_validation_losses():
    method = polytask.methods.create("aw", 2)
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(MissingContextError, match="val_losses"):
        method.backward(x + 1.0, shared_params=[x])
    with pytest.raises(InvalidContextError, match="positive"):
        method.backward(x + 1.0, shared_params=[x], val_losses=torch.tensor([1.0, 0.0]))


def test_state_dict_round_trip_mid_window():
    k, interval = 3, 3
    gen = torch.Generator().manual_seed(0)
    vals = [torch.rand(k, generator=gen, dtype=torch.float64) + 0.5 for _ in range(12)]
    x = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    original = polytask.methods.create("aw", k, interval=interval)
    for v in vals[:7]:
        original.backward(x + 1.0, shared_params=[x], val_losses=v)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("aw", k, interval=interval)
    restored.load_state_dict(torch.load(buffer))
    for v in vals[7:]:
        a = original.backward(x + 1.0, shared_params=[x], val_losses=v).weights
        b = restored.backward(x + 1.0, shared_params=[x], val_losses=v).weights
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_invalid_interval(bad):
    with pytest.raises(InvalidHyperparameterError, match="interval"):
        polytask.methods.create("aw", 2, interval=bad)
