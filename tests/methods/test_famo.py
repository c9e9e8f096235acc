"""FAMO (Liu et al., NeurIPS 2023): objective, logit update against the official rule, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import polytask
from polytask.errors import InvalidHyperparameterError, InvalidLossesError, MethodStateError

from ._helpers import tiny_problem


class _OfficialFAMO:
    """The official update (github.com/Cranial-XIX/FAMO, famo.py), re-written for the test:
    logits as a leaf tensor trained by torch.optim.Adam, their gradient by autograd through
    the softmax."""

    def __init__(self, k: int, gamma: float, w_lr: float, min_losses: torch.Tensor) -> None:
        self.min_losses = min_losses
        self.w = torch.zeros(k, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses.detach()
        z = F.softmax(self.w, -1)
        d = losses - self.min_losses + 1e-8
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def update(self, curr: torch.Tensor) -> None:
        delta = (self.prev - self.min_losses + 1e-8).log() - (curr - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            (d,) = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def _train(method, problem, steps, lr=0.05):
    """SGD steps with ``method`` on ``problem``; returns the weights of every step."""
    opt = torch.optim.SGD(problem.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        losses, _ = problem.forward()
        out.append(method.backward(losses, shared_params=problem.shared()).weights)
        opt.step()
        with torch.no_grad():
            method.after_step(problem.forward()[0])
    return out


@pytest.mark.parametrize("gamma, floor", [(1e-3, 0.0), (1e-2, 0.3), (0.0, 0.0)])
def test_logits_and_gradients_follow_the_official_update(gamma, floor):
    k, w_lr = 3, 0.025
    floors = torch.full((k,), floor)
    ours_problem = tiny_problem(k, dtype=torch.float32)
    ref_problem = tiny_problem(k, dtype=torch.float32)
    method = polytask.methods.create("famo", k, gamma=gamma, w_lr=w_lr, min_losses=floors.tolist())
    ref = _OfficialFAMO(k, gamma, w_lr, floors)
    ours_opt = torch.optim.SGD(ours_problem.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref_problem.parameters(), lr=0.05)
    for _ in range(12):
        ours_opt.zero_grad()
        ref_opt.zero_grad()
        losses, _ = ours_problem.forward()
        result = method.backward(losses, shared_params=ours_problem.shared())
        ref_losses, _ = ref_problem.forward()
        ref.weighted_loss(ref_losses).backward()
        for p, q in zip(ours_problem.parameters(), ref_problem.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        z = F.softmax(ref.w.detach(), -1)
        d = ref_losses.detach() - floors + 1e-8
        torch.testing.assert_close(result.weights, z / d / (z / d).sum(), rtol=1e-5, atol=1e-8)
        ours_opt.step()
        ref_opt.step()
        with torch.no_grad():
            method.after_step(ours_problem.forward()[0])
            ref.update(ref_problem.forward()[0])
        torch.testing.assert_close(method.logits, ref.w.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(method.logits, torch.zeros(k))  # the logits did move


def test_weights_by_hand():
    # xi = 0: z = (1/2, 1/2); D = (1, 2); c = 1/2 + 1/4 = 3/4; w = z / (c D) = (2/3, 1/3).
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = x + torch.tensor([1.0, 2.0], dtype=torch.float64)
    result = polytask.methods.create("famo", 2).backward(losses, shared_params=[x])
    expected = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(result.weights, expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(x.grad, expected, rtol=1e-7, atol=0)
    # With lower bounds m = (0.5, 0): D = (0.5, 2), c = 1 + 1/4, w = (0.8, 0.2).
    x.grad = None
    famo = polytask.methods.create("famo", 2, min_losses=[0.5, 0.0])
    result = famo.backward(x + torch.tensor([1.0, 2.0], dtype=torch.float64), shared_params=[x])
    torch.testing.assert_close(result.weights, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_faster_falling_task_loses_weight():
    # One Adam step from xi = 0 moves each logit by -w_lr * sign of its gradient
    # z_k (delta_k - z . delta): the task whose log-loss fell most is pushed down.
    famo = polytask.methods.create("famo", 3, gamma=0.0)
    x = torch.zeros(3, requires_grad=True)
    famo.backward(x + torch.tensor([1.0, 1.0, 1.0]), shared_params=[x])
    famo.after_step(torch.tensor([0.5, 0.9, 1.0]))
    torch.testing.assert_close(famo.logits, torch.tensor([-0.025, 0.025, 0.025]), rtol=1e-4, atol=0)
    assert famo.task_probabilities.argmin() == 0


def test_after_step_without_backward_is_an_error():
    famo = polytask.methods.create("famo", 2)
    with pytest.raises(MethodStateError, match=r"without a preceding FAMO\.backward"):
        famo.after_step(torch.ones(2))
    x = torch.zeros(2, requires_grad=True)
    famo.backward(x + 1.0, shared_params=[x])
    famo.after_step(torch.full((2,), 0.5))
    with pytest.raises(MethodStateError):
        famo.after_step(torch.full((2,), 0.5))


def test_after_step_checks_its_losses():
    famo = polytask.methods.create("famo", 2)
    x = torch.zeros(2, requires_grad=True)
    famo.backward(x + 1.0, shared_params=[x])
    with pytest.raises(InvalidLossesError, match="2 task losses"):
        famo.after_step(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        famo.after_step(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InvalidLossesError, match=r"task\(s\) 1"):
        famo.after_step(torch.tensor([1.0, -1.0]))


def test_loss_below_its_bound_is_an_error():
    x = torch.zeros(2, requires_grad=True)
    famo = polytask.methods.create("famo", 2, min_losses=[0.0, 2.0])
    with pytest.raises(InvalidLossesError, match=r"task\(s\) 1 \(L=1\)"):
        famo.backward(x + 1.0, shared_params=[x])


def test_state_dict_round_trip_mid_training():
    """Saved between backward and after_step, a restored FAMO continues identically."""
    k = 3
    problem = tiny_problem(k)
    original = polytask.methods.create("famo", k)
    _train(original, problem, 4)
    losses, _ = problem.forward()
    original.backward(losses, shared_params=problem.shared())  # after_step still due
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("famo", k)
    restored.load_state_dict(torch.load(buffer))
    new_losses = problem.forward()[0].detach() * 0.9
    original.after_step(new_losses)
    restored.after_step(new_losses)
    assert torch.equal(original.logits, restored.logits)
    assert torch.equal(original.exp_avg_sq, restored.exp_avg_sq)
    a = _train(original, tiny_problem(k, seed=4), 2)
    b = _train(restored, tiny_problem(k, seed=4), 2)
    for wa, wb in zip(a, b):
        assert torch.equal(wa, wb)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"gamma": -1.0}, "gamma=-1.0"),
        ({"w_lr": 0.0}, "w_lr=0.0"),
        ({"min_losses": [0.0]}, "min_losses"),
        ({"min_losses": [0.0, float("inf")]}, "min_losses"),
        # Not a sequence of numbers: the error names the value instead of a bare TypeError.
        ({"min_losses": 0.0}, "min_losses=0.0 must hold 2"),
        ({"min_losses": "ab"}, "min_losses='ab' must hold 2"),
    ],
)
def test_invalid_hyperparameters(kw, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("famo", 2, **kw)


def test_metadata():
    cls = polytask.methods.get("famo")
    assert cls.needs_losses_after_step and cls.family == "loss"
    assert not list(polytask.methods.create("famo", 2).parameters())  # logits are buffers
