"""DB-MTL (Lin et al., 2023): against the authors' update over a training run, by hand, state."""

from __future__ import annotations

import io

import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError, InvalidLossesError

from ._helpers import random_jacobian, tiny_problem


class _ReferenceDBMTL:
    """The authors' update (LibMTL ``DB_MTL.backward``) re-written for the test: one backward
    of log(L_k + 1e-8) per task, the EMA of the flattened shared gradients, and the sum of the
    EMA rows rescaled to the largest norm; heads keep what the K log-loss backwards left."""

    def __init__(self, k: int, beta: float, beta_sigma: float) -> None:
        self.beta, self.beta_sigma = beta, beta_sigma
        self.step = 0
        self.buffer = None

    def backward(self, losses, shared, heads) -> None:
        self.step += 1
        rows = []
        for k in range(len(losses)):
            grads = torch.autograd.grad(
                torch.log(losses[k] + 1e-8), [*shared, *heads], retain_graph=True, allow_unused=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
            for p, g in zip(heads, grads[len(shared) :]):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad + g
        batch = torch.stack(rows)
        if self.buffer is None:
            self.buffer = torch.zeros_like(batch)
        self.buffer = batch + (self.beta / self.step**self.beta_sigma) * (self.buffer - batch)
        norms = self.buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        new = sum(alpha[i] * self.buffer[i] for i in range(len(losses)))
        offset = 0
        for p in shared:
            p.grad = new[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


@pytest.mark.parametrize("beta, beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_training_run_matches_the_authors_update(beta, beta_sigma):
    k = 3
    ours, ref_problem = tiny_problem(k), tiny_problem(k)
    method = polytask.methods.create("db_mtl", k, beta=beta, beta_sigma=beta_sigma)
    ref = _ReferenceDBMTL(k, beta, beta_sigma)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(ref_problem.parameters(), lr=0.05)
    for _ in range(6):
        opt_a.zero_grad()
        opt_b.zero_grad()
        losses, _ = ours.forward()
        result = method.backward(losses, shared_params=ours.shared())
        ref_losses, _ = ref_problem.forward()
        ref.backward(ref_losses, ref_problem.shared(), list(ref_problem.heads.parameters()))
        for p, q in zip(ours.parameters(), ref_problem.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.head_weights, 1 / (losses.detach() + 1e-8))
        assert result.weights is None
        opt_a.step()
        opt_b.step()


def test_direction_by_hand():
    # Orthogonal task gradients of norms 1 and 3, losses 1 and 2, beta = 0.9, fresh EMA:
    # ghat = 0.1 * (e1 / 1, 3 e2 / 2); max norm 0.15; d = 0.15 (e1 + e2) up to the 1e-8 offsets.
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([x[0] + 1.0, 3.0 * x[1] + 2.0])
    polytask.methods.create("db_mtl", 2).backward(losses, shared_params=[x])
    torch.testing.assert_close(x.grad, torch.tensor([0.15, 0.15], dtype=torch.float64))


def test_constant_gradients_ema_and_equal_contributions():
    """With a constant Jacobian, ghat_t = (1 - beta^t) g and every task contributes a vector
    of the largest norm: d = (1 - beta^t) max_j ||g_j|| sum_k g_k / ||g_k|| (up to the 1e-8
    offset in the norms, ~1e-6 relative for the smallest gradient here)."""
    jac = random_jacobian(3, 7, seed=2) * torch.tensor([[0.1], [1.0], [10.0]], dtype=torch.float64)
    method = polytask.methods.create("db_mtl", 3, beta=0.8)
    norms = jac.norm(dim=1)
    unit_sum = (jac / norms[:, None]).sum(0)
    for t in range(1, 5):
        d = method.aggregate(jac)
        torch.testing.assert_close(d, (1 - 0.8**t) * norms.max() * unit_sum, rtol=2e-6, atol=0)


def test_state_dict_round_trip_mid_training():
    k = 3
    problem = tiny_problem(k)
    original = polytask.methods.create("db_mtl", k)
    for _ in range(3):
        problem.zero_grad()
        problem.backward(original)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("db_mtl", k)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.grad_ema, original.grad_ema) and int(restored.step) == 3
    problem.zero_grad()
    problem.backward(original)
    expected = problem.grads()
    problem.zero_grad()
    problem.backward(restored)
    for a, b in zip(expected, problem.grads()):
        assert torch.equal(a, b)


def test_changed_parameter_shape_is_an_error():
    method = polytask.methods.create("db_mtl", 2)
    method.aggregate(random_jacobian(2, 5))
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        method.aggregate(random_jacobian(2, 6))


def test_negative_loss_is_an_error():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(InvalidLossesError, match=r"task\(s\) 1"):
        polytask.methods.create("db_mtl", 2).backward(
            x + torch.tensor([1.0, -0.5]), shared_params=[x]
        )


def test_features_mode_is_refused():
    problem = tiny_problem(2)
    with pytest.raises(ValueError, match="mode='params'"):
        problem.backward(polytask.methods.create("db_mtl", 2), "features")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"beta": 1.0}, "beta=1.0"),
        ({"beta": -0.1}, "beta=-0.1"),
        ({"beta_sigma": -1}, "beta_sigma"),
    ],
)
def test_invalid_hyperparameters(kw, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("db_mtl", 2, **kw)
