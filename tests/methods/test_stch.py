"""STCH (Lin et al., ICML 2024): warm-up, nadir point, smooth max, against the official code."""

from __future__ import annotations

import io
import math

import pytest
import torch

import polytask
from polytask.errors import (
    InvalidHyperparameterError,
    InvalidLossesError,
    MethodStateError,
    MissingContextError,
)

from ._helpers import tiny_problem


class _OfficialSTCH:
    """The official MTL code (github.com/Xi-L/STCH, STCH_MTL/LibMTL/weighting/STCH.py)
    re-written for the test: returns the objective it back-propagates."""

    def __init__(self, k: int, mu: float, warmup: int) -> None:
        self.k, self.mu, self.warmup = k, mu, warmup
        self.nadir = None
        self.total, self.count = 0.0, 0

    def objective(self, losses: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch < self.warmup:
            return torch.log(losses + 1e-20).sum()
        if epoch == self.warmup:
            self.total = self.total + losses.detach()
            self.count += 1
            return torch.log(losses + 1e-20).sum()
        if self.nadir is None:
            self.nadir = self.total / self.count
        logs = torch.log(losses / self.nadir + 1e-20)
        reg = logs - logs.detach().max()
        return self.mu * torch.log(torch.exp(reg / self.mu).sum()) * self.k


@pytest.mark.parametrize("mu, warmup", [(1.0, 1), (0.1, 0), (3.0, 2)])
def test_training_run_matches_the_official_code(mu, warmup):
    k = 3
    ours, ref_problem = tiny_problem(k), tiny_problem(k)
    method = polytask.methods.create("stch", k, mu=mu, warmup_epochs=warmup)
    ref = _OfficialSTCH(k, mu, warmup)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.02)
    opt_b = torch.optim.SGD(ref_problem.parameters(), lr=0.02)
    for epoch in range(warmup + 3):
        for _ in range(3):
            opt_a.zero_grad()
            opt_b.zero_grad()
            losses, _ = ours.forward()
            result = method.backward(losses, shared_params=ours.shared(), epoch=epoch)
            ref_losses, _ = ref_problem.forward()
            total = ref.objective(ref_losses, epoch)
            (expected_w,) = torch.autograd.grad(total, ref_losses, retain_graph=True)
            total.backward()
            torch.testing.assert_close(result.weights, expected_w, rtol=1e-10, atol=0)
            for p, q in zip(ours.parameters(), ref_problem.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
            opt_a.step()
            opt_b.step()
    torch.testing.assert_close(method.nadir, ref.nadir)


def test_nadir_is_the_mean_loss_of_the_warmup_epoch():
    method = polytask.methods.create("stch", 2, warmup_epochs=1)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    method.backward(x + torch.tensor([9.0, 9.0]), shared_params=[x], epoch=0)  # not averaged
    method.backward(x + torch.tensor([1.0, 4.0]), shared_params=[x], epoch=1)
    method.backward(x + torch.tensor([3.0, 2.0]), shared_params=[x], epoch=1)
    # Epoch 2: f = log(L / n) with n = (2, 3); at L = n, f = 0 and the weights are K s / n.
    result = method.backward(x + torch.tensor([2.0, 3.0]), shared_params=[x], epoch=2)
    torch.testing.assert_close(method.nadir, torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(result.weights, torch.tensor([1 / 2, 1 / 3], dtype=torch.float64))


def test_warmup_weights_are_inverse_losses():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    result = polytask.methods.create("stch", 2).backward(
        x + torch.tensor([0.5, 4.0]), shared_params=[x], epoch=0
    )
    torch.testing.assert_close(result.weights, torch.tensor([2.0, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("mu", [1.0, 0.1, 1e-3])
def test_smooth_max_bounds(mu):
    """max_k lambda_k f_k <= g_mu <= max_k lambda_k f_k + mu log K (the paper's Prop. 3.3)."""
    k = 4
    method = polytask.methods.create("stch", k, mu=mu, warmup_epochs=0, pref_vector=[1, 2, 1, 0.5])
    method.nadir.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    method.has_nadir.fill_(True)
    losses = torch.tensor([1.5, 2.5, 0.4, 3.0], dtype=torch.float64, requires_grad=True)
    total, weights = method.objective(losses, epoch=1)
    total = total.detach()
    f = torch.log(losses.detach() / method.nadir) * method.preference
    assert float(f.max()) * k - 1e-9 <= float(total) <= k * (float(f.max()) + mu * math.log(k))
    if mu == 1e-3:  # the gradient concentrates on the worst task: task 3, 0.5 log 3 = 0.55
        assert int(f.argmax()) == 3 and int(weights.argmax()) == 3
        assert float(weights[:3].sum()) < 1e-6 * float(weights[3])


def test_nadir_without_the_warmup_epoch_is_an_error():
    method = polytask.methods.create("stch", 2, warmup_epochs=2)
    x = torch.zeros(2, requires_grad=True)
    method.backward(x + 1.0, shared_params=[x], epoch=0)
    with pytest.raises(MethodStateError, match="saw no step"):
        method.backward(x + 1.0, shared_params=[x], epoch=3)


def test_needs_epoch_and_positive_losses():
    method = polytask.methods.create("stch", 2)
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(MissingContextError, match="epoch"):
        method.backward(x + 1.0, shared_params=[x])
    with pytest.raises(InvalidLossesError, match=r"task\(s\) 0"):
        method.backward(x + torch.tensor([0.0, 1.0]), shared_params=[x], epoch=0)


def test_state_dict_round_trip_during_the_warmup():
    k = 2
    original = polytask.methods.create("stch", k, warmup_epochs=1)
    x = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    original.backward(x + torch.tensor([1.0, 4.0]), shared_params=[x], epoch=1)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("stch", k, warmup_epochs=1)
    restored.load_state_dict(torch.load(buffer))
    for m in (original, restored):
        m.backward(x + torch.tensor([3.0, 2.0]), shared_params=[x], epoch=1)
    a = original.backward(x + 1.0, shared_params=[x], epoch=2).weights
    b = restored.backward(x + 1.0, shared_params=[x], epoch=2).weights
    assert torch.equal(a, b) and torch.equal(original.nadir, restored.nadir)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mu": 0.0}, "mu=0.0"),
        ({"warmup_epochs": -1}, "warmup_epochs=-1"),
        ({"warmup_epochs": 1.5}, "warmup_epochs=1.5"),
        ({"pref_vector": [1.0, -1.0]}, "pref_vector"),
        ({"pref_vector": [1.0]}, "pref_vector"),
    ],
)
def test_invalid_hyperparameters(kw, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("stch", 2, **kw)
