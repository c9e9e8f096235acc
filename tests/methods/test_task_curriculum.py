"""spMTL task curriculum (Murugesan & Carbonell, IJCAI 2017): the closed form, the pace, state."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import InvalidContextError, InvalidHyperparameterError, MissingContextError
from polytask.methods.task_curriculum import self_paced_task_weights

from ._helpers import assert_weighted_shared_grad, epoch_step, linear_problem

# Per-step losses of three epochs (K = 3, three steps each).
EPOCHS = [
    [[2.0, 1.0, 4.0], [1.6, 0.8, 3.8], [1.2, 0.9, 4.2]],
    [[1.0, 0.7, 3.9], [0.9, 0.5, 4.1], [0.8, 0.6, 3.6]],
    [[0.5, 0.5, 3.5], [0.7, 0.3, 3.4], [0.3, 0.4, 3.3]],
]


step = epoch_step


def official_updates(epoch_means: list[np.ndarray], pace: float, c: float) -> list[np.ndarray]:
    """The official SPMTFLearner.m loop, selftype='prob': per outer iteration
    tau = exp(-taskF / lambda); tau = tau / sum(tau); lambda = lambda * c."""
    out = []
    for task_f in epoch_means:
        tau = np.exp(-task_f / pace)
        out.append(tau / tau.sum())
        pace = pace * c
    return out


def test_hand_computed_two_task_case():
    """l = (1, 2), lambda = 1: tau = (e^-1, e^-2) / (e^-1 + e^-2) = (1, e^-1) / (1 + e^-1)."""
    tau = self_paced_task_weights(torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0)
    e = np.exp(-1.0)
    np.testing.assert_allclose(tau.numpy(), [1 / (1 + e), e / (1 + e)], rtol=1e-15)


def test_closed_form_minimises_the_entropy_regularised_objective():
    """tau* minimises sum tau l + lambda sum tau log tau on the simplex, with minimum
    -lambda log sum exp(-l / lambda) (the Gibbs variational principle)."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.tensor([0.3, 1.7, 0.9, 2.5], dtype=torch.float64)
    pace = 0.8

    def value(tau):
        return float((tau * losses).sum() + pace * (tau * tau.log()).sum())

    tau = self_paced_task_weights(losses, pace)
    assert float(tau.sum()) == pytest.approx(1.0, abs=1e-15)
    best = value(tau)
    assert best == pytest.approx(float(-pace * torch.logsumexp(-losses / pace, 0)), abs=1e-12)
    for _ in range(200):
        other = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample()
        other = other.clamp_min(1e-300)
        assert value(other) >= best - 1e-12
    # A small move along the simplex from tau* cannot decrease the objective either.
    d = torch.randn(4, generator=gen, dtype=torch.float64)
    d -= d.mean()
    assert value(tau + 1e-4 * d) >= best - 1e-15


def test_easy_tasks_first_and_uniform_in_the_limit():
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    tau = self_paced_task_weights(losses, 1.0)
    assert tau[0] > tau[2] > tau[1]  # lower loss, larger weight
    np.testing.assert_allclose(self_paced_task_weights(losses, 1e9).numpy(), np.ones(3) / 3)
    sharp = self_paced_task_weights(losses, 1e-3).numpy()
    np.testing.assert_allclose(sharp, [1, 0, 0], atol=1e-200)


def test_huge_losses_do_not_underflow():
    """exp(-l / lambda) underflows to 0 for every task here; the normalised weights do not."""
    tau = self_paced_task_weights(torch.tensor([1000.0, 1001.0], dtype=torch.float64), 1.0)
    e = np.exp(-1.0)
    np.testing.assert_allclose(tau.numpy(), [1 / (1 + e), e / (1 + e)], rtol=1e-14)


@pytest.mark.parametrize(("pace", "growth"), [(1.0, 1.1), (0.3, 2.0)])
def test_epoch_schedule_matches_the_official_update(pace, growth):
    method = polytask.methods.create("task_curriculum", 3, pace=pace, growth=growth)
    seen = [[step(method, values, epoch) for values in steps] for epoch, steps in enumerate(EPOCHS)]
    w3 = step(method, [9.0, 9.0, 9.0], 3)
    means = [np.mean(steps, axis=0) for steps in EPOCHS]
    expected = official_updates(means, pace, growth)
    for w in seen[0]:  # no update yet: uniform
        np.testing.assert_array_equal(w.numpy(), np.full(3, 1 / 3))
    for epoch in (1, 2):  # epoch e uses the mean of epoch e - 1; fixed within the epoch
        for w in seen[epoch]:
            np.testing.assert_allclose(w.numpy(), expected[epoch - 1], rtol=1e-12)
    np.testing.assert_allclose(w3.numpy(), expected[2], rtol=1e-12)
    assert method.updates == 3
    assert float(method.current_pace) == pytest.approx(pace * growth**3, rel=1e-14)


def test_curriculum_moves_from_easy_to_uniform():
    """Fixed losses: the easiest task's weight falls and the hardest's rises as lambda grows."""
    method = polytask.methods.create("task_curriculum", 3, pace=0.5, growth=1.5)
    history = [step(method, [0.2, 1.0, 2.0], epoch) for epoch in range(12)]
    easy = [float(w[0]) for w in history[1:]]
    hard = [float(w[2]) for w in history[1:]]
    assert all(a > b for a, b in itertools.pairwise(easy))
    assert all(a < b for a, b in itertools.pairwise(hard))
    assert easy[0] > 0.8 and abs(easy[-1] - 1 / 3) < 0.05


def test_skipped_epochs_give_one_update():
    method = polytask.methods.create("task_curriculum", 2, pace=1.0)
    step(method, [1.0, 3.0], 0)
    w = step(method, [5.0, 5.0], 4)
    np.testing.assert_allclose(w.numpy(), official_updates([np.array([1.0, 3.0])], 1.0, 1.1)[0])
    assert method.updates == 1


def test_negative_losses_are_accepted():
    method = polytask.methods.create("task_curriculum", 2, pace=2.0)
    step(method, [-1.0, 3.0], 0)
    w = step(method, [0.0, 0.0], 1)
    np.testing.assert_allclose(w.numpy(), official_updates([np.array([-1.0, 3.0])], 2.0, 1.1)[0])


def test_backward_weights_the_encoder_and_leaves_heads_unweighted():
    """The encoder gets tau @ J; head t its own task's raw gradient (tau does not change the
    minimiser of the objective in w_t)."""
    problem = linear_problem(2, seed=2)
    method = polytask.methods.create("task_curriculum", 2, pace=0.5)
    for epoch in range(2):
        problem.zero_grad()
        losses, _ = problem.forward()
        result = method.backward(losses, shared_params=problem.shared(), epoch=epoch)
    assert not torch.allclose(result.weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert_weighted_shared_grad(problem, result.weights)
    torch.testing.assert_close(result.head_weights, torch.ones(2, dtype=torch.float64))
    for i, head in enumerate(problem.heads):
        losses, _ = problem.forward()
        grads = torch.autograd.grad(losses[i], list(head.parameters()))
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g)


def test_loss_scale_keeps_tau_on_the_true_losses():
    """fp16 loss scaling: tau is computed from L / S, and .grad holds S x the unscaled step."""
    scale = 1024.0
    plain, scaled = (polytask.methods.create("task_curriculum", 2, pace=0.5) for _ in range(2))
    grads = []
    for method, s in ((plain, None), (scaled, scale)):
        problem = linear_problem(2, seed=4)
        for epoch in range(2):
            problem.zero_grad()
            losses, _ = problem.forward()
            ctx = {"epoch": epoch} if s is None else {"epoch": epoch, "loss_scale": s}
            result = method.backward(
                losses if s is None else losses * s, shared_params=problem.shared(), **ctx
            )
        grads.append((result.weights, [p.grad.clone() for p in problem.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, scale * a, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_mid_epoch():
    original = polytask.methods.create("task_curriculum", 3, pace=0.7)
    for epoch, steps in enumerate(EPOCHS[:2]):
        for values in steps:
            step(original, values, epoch)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("task_curriculum", 3, pace=0.7)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert (restored.epoch, restored.steps, restored.updates) == (1, 3, 1)
    for values in EPOCHS[2]:
        np.testing.assert_array_equal(step(original, values, 2), step(restored, values, 2))
    np.testing.assert_array_equal(step(original, [1, 1, 1], 3), step(restored, [1, 1, 1], 3))
    assert float(original.current_pace) == float(restored.current_pace)


def test_missing_or_decreasing_epoch():
    method = polytask.methods.create("task_curriculum", 2)
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(MissingContextError, match="epoch"):
        method.backward(torch.tensor([1.0, 2.0], dtype=torch.float64) + p, shared_params=[p])
    step(method, [1.0, 2.0], 3)
    with pytest.raises(InvalidContextError, match="epoch=2"):
        step(method, [1.0, 2.0], 2)


@pytest.mark.parametrize(
    "kw",
    [
        {"pace": 0.0},
        {"pace": -1.0},
        {"pace": float("inf")},
        {"pace": True},
        {"growth": 0.9},
        {"growth": float("nan")},
        {"growth": "1.1"},
    ],
)
def test_invalid_hyperparameters_name_the_value(kw):
    with pytest.raises(InvalidHyperparameterError, match=next(iter(kw))):
        polytask.methods.create("task_curriculum", 2, **kw)
