"""RLW (Lin et al., TMLR 2022): the sampling distributions, seeding and the weighted objective."""

from __future__ import annotations

import io
import math

import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError

from ._helpers import assert_weighted_shared_grad, linear_problem

DRAWS = 3000


def draws(k: int, distribution: str, seed: int = 0, n: int = DRAWS) -> torch.Tensor:
    method = polytask.methods.create("rlw", k, distribution=distribution, seed=seed)
    return torch.stack([method.sample() for _ in range(n)])


def test_default_is_the_softmax_of_a_standard_normal_draw():
    method = polytask.methods.create("rlw", 4, seed=11)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        z = torch.randn(4, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(method.sample(), torch.softmax(z, 0), rtol=0, atol=0)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet", "random_normal"])
def test_softmax_distributions_lie_on_the_simplex_with_mean_one_over_k(distribution):
    k = 3
    w = draws(k, distribution)
    assert bool((w > 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(DRAWS, dtype=torch.float64))
    if distribution != "random_normal":  # exchangeable in the tasks: E[w_k] = 1/K
        torch.testing.assert_close(
            w.mean(0), torch.full((k,), 1 / k, dtype=w.dtype), atol=0.01, rtol=0
        )


@pytest.mark.parametrize("distribution", ["uniform", "dirichlet"])
def test_softmax_of_the_unit_interval_is_bounded(distribution):
    """z in [0, 1]^K (a uniform draw, or a Dirichlet draw on the simplex) bounds softmax(z)."""
    k = 4
    w = draws(k, distribution, n=500)
    low, high = 1 / (1 + (k - 1) * math.e), math.e / (math.e + k - 1)
    assert float(w.min()) >= low and float(w.max()) <= high


def test_standard_normal_spread():
    """log w_k - log w_j = z_k - z_j ~ N(0, 2) for the default distribution."""
    w = draws(2, "normal")
    diff = torch.log(w[:, 0]) - torch.log(w[:, 1])
    assert abs(float(diff.mean())) < 0.1
    assert float(diff.var()) == pytest.approx(2.0, rel=0.1)


def test_random_normal_uses_its_fixed_mean_and_std():
    method = polytask.methods.create("rlw", 3, distribution="random_normal", seed=5)
    mean, std = method.normal_mean.clone(), method.normal_std.clone()
    assert bool(((mean >= 0) & (mean < 1) & (std >= 0) & (std < 1)).all())
    w = torch.stack([method.sample() for _ in range(DRAWS)])
    logw = torch.log(w)
    centred = logw - logw.mean(1, keepdim=True)  # = z - mean(z), z ~ N(mean, std^2)
    torch.testing.assert_close(centred.mean(0), mean - mean.mean(), atol=0.05, rtol=0)
    assert torch.equal(method.normal_mean, mean)  # drawn once, not per step


def test_bernoulli_weights_are_zero_one_and_never_all_zero():
    k = 3
    w = draws(k, "bernoulli")
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert bool((w.sum(1) >= 1).all())
    # P(w_k = 1 | not all zero) = (1/2) / (1 - 2^-K)
    expected = 0.5 / (1 - 2.0**-k)
    torch.testing.assert_close(
        w.mean(0), torch.full((k,), expected, dtype=w.dtype), atol=0.03, rtol=0
    )


def test_constrained_bernoulli_picks_one_task_uniformly():
    k = 4
    w = draws(k, "constrained_bernoulli")
    assert bool((w.sum(1) == 1).all()) and set(w.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(w.mean(0), torch.full((k,), 1 / k, dtype=w.dtype), atol=0.03, rtol=0)


@pytest.mark.parametrize("distribution", ["normal", "bernoulli", "random_normal"])
def test_seeded_determinism(distribution):
    a = draws(3, distribution, seed=2, n=5)
    b = draws(3, distribution, seed=2, n=5)
    c = draws(3, distribution, seed=3, n=5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_applies_the_drawn_weights():
    problem = linear_problem(3, seed=1)
    method = polytask.methods.create("rlw", 3, seed=4)
    twin = polytask.methods.create("rlw", 3, seed=4)
    result = problem.backward(method)
    torch.testing.assert_close(result.weights, twin.sample())
    assert_weighted_shared_grad(problem, result.weights)
    assert not torch.equal(problem.backward(method).weights, result.weights)  # fresh each step


def test_state_dict_round_trip_continues_the_stream():
    original = polytask.methods.create("rlw", 3, distribution="random_normal", seed=8)
    original.sample()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("rlw", 3, distribution="random_normal", seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    for _ in range(3):
        torch.testing.assert_close(restored.sample(), original.sample(), rtol=0, atol=0)


def test_unknown_distribution():
    with pytest.raises(InvalidHyperparameterError, match="distribution='gaussian'"):
        polytask.methods.create("rlw", 2, distribution="gaussian")
