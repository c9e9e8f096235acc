"""ExcessMTL (He et al., ICML 2024): against the official update, by hand, features mode, state."""

from __future__ import annotations

import io

import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError, NonFiniteError

from ._helpers import random_jacobian, tiny_problem


class _OfficialExcessMTL:
    """The official update (github.com/yifei-he/ExcessMTL, ExcessMTL.backward) re-written for
    the test: per-task autograd gradients of the shared parameters, the AdaGrad-style
    estimate, the exponentiated update normalised to sum K, then backward of sum w_k L_k."""

    def __init__(self, k: int, step_size: float) -> None:
        self.k, self.step_size = k, step_size
        self.loss_weight = torch.ones(k, dtype=torch.float64)
        self.grad_sum = None
        self.first = True

    def backward(self, losses, shared, features=None) -> torch.Tensor:
        inputs = shared if features is None else [features]
        rows = []
        for i in range(self.k):
            grads = torch.autograd.grad(losses[i], inputs, retain_graph=True)
            if features is None:
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            else:  # representation gradients summed over the batch
                rows.append(grads[0].sum(dim=0).reshape(-1))
        grads = torch.stack(rows)
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        w = torch.zeros(self.k, dtype=torch.float64)
        for i in range(self.k):
            self.grad_sum[i] += grads[i] ** 2
            h_i = torch.sqrt(self.grad_sum[i] + 1e-7)
            w[i] = grads[i] * (1 / h_i) @ grads[i]
        if self.first:
            self.initial_w = w
            self.first = False
        else:
            self.loss_weight = self.loss_weight * torch.exp(w / self.initial_w * self.step_size)
            self.loss_weight = self.loss_weight / self.loss_weight.sum() * self.k
        (losses * self.loss_weight).sum().backward()
        return self.loss_weight


@pytest.mark.parametrize("mode, step_size", [("params", 1e-2), ("params", 1.0), ("features", 0.5)])
def test_training_run_matches_the_official_update(mode, step_size):
    k = 3
    ours, ref_problem = tiny_problem(k), tiny_problem(k)
    method = polytask.methods.create("excess_mtl", k, robust_step_size=step_size)
    ref = _OfficialExcessMTL(k, step_size)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref_problem.parameters(), lr=0.1)
    reported, expected = [], []
    for _ in range(6):
        opt_a.zero_grad()
        opt_b.zero_grad()
        result = ours.backward(method, mode)
        losses, features = ref_problem.forward()
        expected_w = ref.backward(
            losses, ref_problem.shared(), features if mode == "features" else None
        )
        torch.testing.assert_close(result.weights, expected_w, rtol=1e-10, atol=0)
        reported.append(result.weights)
        expected.append(expected_w.clone())
        for p, q in zip(ours.parameters(), ref_problem.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        opt_a.step()
        opt_b.step()
    assert not torch.allclose(result.weights, torch.ones(k, dtype=torch.float64))
    # Reported weights are snapshots, not views of the method's state.
    torch.testing.assert_close(torch.stack(reported), torch.stack(expected), rtol=1e-10, atol=0)


def test_weights_by_hand():
    # Step 1: g = (1, 0) and (0, 2); H = sqrt(g^2 + 1e-7), e = (~1, ~2), weights stay 1.
    # Step 2: g = (2, 0) and (0, 2); sums of squares (5, 8); e = (4/sqrt(5), 4/sqrt(8)),
    # ratios r = (4/sqrt(5) / 1, sqrt(2) / 2) up to 1e-7; w = 2 softmax(eta r) with eta = 1.
    method = polytask.methods.create("excess_mtl", 2, robust_step_size=1.0)
    first = method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(first, torch.tensor([1.0, 2.0], dtype=torch.float64))
    method.aggregate(torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    r = torch.tensor([4 / 5**0.5, 2**0.5 / 2], dtype=torch.float64)
    expected = 2 * torch.exp(r) / torch.exp(r).sum()
    torch.testing.assert_close(method.task_weights, expected, rtol=1e-6, atol=0)
    assert method.task_weights[0] > method.task_weights[1]


def test_slower_converging_task_gains_weight():
    """A task whose gradient stays large (far from convergence) gains weight over one whose
    gradient shrinks (converging), the paper's intended behaviour."""
    method = polytask.methods.create("excess_mtl", 2, robust_step_size=0.5)
    base = random_jacobian(2, 6, seed=3)
    for t in range(8):
        method.aggregate(base * torch.tensor([[1.0], [0.5**t]], dtype=torch.float64))
    assert method.task_weights[0] > 1.0 > method.task_weights[1]
    torch.testing.assert_close(method.task_weights.sum(), torch.tensor(2.0, dtype=torch.float64))


def test_zero_first_step_estimate_is_an_error():
    method = polytask.methods.create("excess_mtl", 3)
    jac = random_jacobian(3, 4)
    jac[1] = 0
    method.aggregate(jac)  # the first step only records e(1)
    with pytest.raises(NonFiniteError, match=r"task\(s\) \[1\]"):
        method.aggregate(random_jacobian(3, 4, seed=1))


def test_large_step_does_not_overflow():
    method = polytask.methods.create("excess_mtl", 2, robust_step_size=1e4)
    method.aggregate(torch.tensor([[1e-3, 0.0], [0.0, 1.0]], dtype=torch.float64))
    d = method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.isfinite(d).all()
    torch.testing.assert_close(method.task_weights, torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_state_dict_round_trip_mid_training():
    k = 3
    problem = tiny_problem(k)
    original = polytask.methods.create("excess_mtl", k, robust_step_size=0.3)
    for _ in range(3):
        problem.zero_grad()
        problem.backward(original)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("excess_mtl", k, robust_step_size=0.3)
    restored.load_state_dict(torch.load(buffer))
    p = sum(q.numel() for q in problem.shared())
    a = [original.aggregate(random_jacobian(k, p, seed=s)) for s in range(2)]
    b = [restored.aggregate(random_jacobian(k, p, seed=s)) for s in range(2)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_invalid_step_size(bad):
    with pytest.raises(InvalidHyperparameterError, match="robust_step_size"):
        polytask.methods.create("excess_mtl", 2, robust_step_size=bad)
