"""The Method.backward contract of DESIGN.md, checked on EW and MGDA and a test-local method."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

import polytask
from polytask.errors import (
    EmptyParametersError,
    InvalidContextError,
    InvalidLossesError,
    MissingContextError,
    PolytaskError,
    UnknownMethodError,
)
from polytask.methods import AggregationResult, GradientMethod
from polytask.solvers import min_norm_simplex

from ._helpers import tiny_problem


class _MeanWithKpis(GradientMethod):
    """Test-local gradient method: mean gradient, needs `kpis` in ctx."""

    paper: ClassVar[str] = "test"
    needs: ClassVar[frozenset[str]] = frozenset({"kpis"})

    def _aggregate(self, jacobian, losses=None, **ctx):
        self.seen_ctx = ctx
        w = torch.full((jacobian.shape[0],), 1 / jacobian.shape[0], dtype=jacobian.dtype)
        return AggregationResult(direction=w @ jacobian, weights=w)


def test_create_unknown_method_lists_close_names():
    with pytest.raises(UnknownMethodError, match="did you mean 'mgda'"):
        polytask.methods.create("mgdaa", num_tasks=2)
    with pytest.raises(ValueError):
        polytask.methods.create("nope", num_tasks=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_invalid_num_tasks(bad):
    with pytest.raises(ValueError, match="num_tasks"):
        polytask.methods.create("mgda", num_tasks=bad)


def test_invalid_hparam_value_names_it():
    with pytest.raises(ValueError, match="normalization='l3'"):
        polytask.methods.create("mgda", 2, normalization="l3")
    with pytest.raises(ValueError, match="jacobian strategy 'fast'"):
        polytask.methods.create("mgda", 2, jacobian_strategy="fast")


def test_losses_must_be_a_1d_tensor_of_k():
    problem = tiny_problem(2)
    losses, _ = problem.forward()
    m = polytask.methods.create("mgda", 2)
    with pytest.raises(InvalidLossesError, match="got list"):
        m.backward(list(losses), shared_params=problem.shared())
    with pytest.raises(InvalidLossesError, match=r"shape \(1, 2\)"):
        m.backward(losses[None], shared_params=problem.shared())
    with pytest.raises(InvalidLossesError, match="does not require grad"):
        m.backward(losses.detach(), shared_params=problem.shared())


def test_frozen_shared_params_are_left_alone():
    problem = tiny_problem(2)
    frozen = problem.encoder[0].bias
    frozen.requires_grad_(False)
    losses, _ = problem.forward()
    polytask.methods.create("mgda", 2).backward(losses, shared_params=problem.shared())
    assert frozen.grad is None
    assert problem.encoder[0].weight.grad is not None


def test_all_frozen_shared_params_is_an_error():
    problem = tiny_problem(2)
    for p in problem.shared():
        p.requires_grad_(False)
    losses, _ = problem.forward()
    with pytest.raises(EmptyParametersError, match="none requires grad"):
        polytask.methods.create("mgda", 2).backward(losses, shared_params=problem.shared())


def test_unreached_shared_param_gets_zeros():
    problem = tiny_problem(2)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    losses, _ = problem.forward()
    polytask.methods.create("mgda", 2).backward(losses, shared_params=[*problem.shared(), unused])
    assert torch.equal(unused.grad, torch.zeros(3, dtype=torch.float64))


def test_mgda_params_mode_is_min_norm_of_the_true_jacobian():
    problem = tiny_problem(3)
    jac = problem.task_jacobian()
    losses, _ = problem.forward()
    result = polytask.methods.create("mgda", 3).backward(losses, shared_params=problem.shared())
    w = min_norm_simplex(jac @ jac.T)
    torch.testing.assert_close(result.weights, w)
    shared = torch.cat([p.grad.reshape(-1) for p in problem.shared()])
    torch.testing.assert_close(shared, w @ jac)


def test_features_mode_is_mgda_ub():
    """MGDA-UB: weights from the Jacobian w.r.t. the features, one backward through the encoder."""
    problem = tiny_problem(3)
    losses, features = problem.forward()
    feat_jac = torch.stack(
        [
            torch.autograd.grad(losses[k], features, retain_graph=True)[0].reshape(-1)
            for k in range(3)
        ]
    )
    w = min_norm_simplex(feat_jac @ feat_jac.T)
    jac = problem.task_jacobian()
    result = polytask.methods.create("mgda", 3).backward(
        losses, shared_params=problem.shared(), features=features, mode="features"
    )
    torch.testing.assert_close(result.weights, w)
    shared = torch.cat([p.grad.reshape(-1) for p in problem.shared()])
    torch.testing.assert_close(shared, w @ jac)


def test_features_mode_needs_features():
    problem = tiny_problem(2)
    losses, features = problem.forward()
    m = polytask.methods.create("mgda", 2)
    with pytest.raises(ValueError, match="features="):
        m.backward(losses, shared_params=problem.shared(), mode="features")
    with pytest.raises(ValueError, match="requires grad"):
        m.backward(
            losses, shared_params=problem.shared(), features=features.detach(), mode="features"
        )
    with pytest.raises(ValueError, match="mode='both'"):
        m.backward(losses, shared_params=problem.shared(), mode="both")


def test_tied_parameter_in_heads_counts_as_shared():
    """A parameter used by the encoder and by every head is shared: it gets the balanced grad."""
    torch.manual_seed(0)
    w_shared = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    heads = [nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    x = torch.randn(5, 4, dtype=torch.float64)
    h = torch.tanh(x @ w_shared)
    losses = torch.stack([((h @ w_shared) @ heads[k]).pow(2).mean() for k in range(2)])
    rows = [
        torch.autograd.grad(losses[k], w_shared, retain_graph=True)[0].reshape(-1) for k in range(2)
    ]
    jac = torch.stack(rows)
    result = polytask.methods.create("mgda", 2).backward(losses, shared_params=[w_shared])
    torch.testing.assert_close(w_shared.grad.reshape(-1), result.weights @ jac)


def test_missing_context_is_named():
    problem = tiny_problem(2)
    losses, _ = problem.forward()
    m = _MeanWithKpis(2)
    with pytest.raises(MissingContextError, match="kpis"):
        m.backward(losses, shared_params=problem.shared())
    m.backward(losses, shared_params=problem.shared(), kpis=[0.5, 0.5])
    # The method sees the checked value: a detached tensor of shape [K].
    assert m.seen_ctx["kpis"].tolist() == [0.5, 0.5]
    assert len(m.seen_ctx["param_sizes"]) == len(problem.shared())


def test_context_is_checked_before_the_method_sees_it():
    problem = tiny_problem(2)
    losses, _ = problem.forward()
    m = _MeanWithKpis(2)
    with pytest.raises(InvalidContextError, match=r"kpis must have shape \(2,\)"):
        m.backward(losses, shared_params=problem.shared(), kpis=[0.5, 0.5, 0.5])
    with pytest.raises(InvalidContextError, match=r"must lie in \[0.0, 1.0\]"):
        m.backward(losses, shared_params=problem.shared(), kpis=[0.5, 1.5])
    with pytest.raises(InvalidContextError, match=r"unknown context key.*'kpi'"):
        m.backward(losses, shared_params=problem.shared(), kpis=[0.5, 0.5], kpi=[1, 1])


def test_partial_steps_are_refused_by_methods_that_do_not_support_them():
    problem = tiny_problem(2)
    losses, _ = problem.forward()
    m = polytask.methods.create("nash_mtl", 2)
    assert not m.partial_tasks
    with pytest.raises(InvalidContextError, match="only some tasks"):
        m.backward(losses, shared_params=problem.shared(), present=torch.tensor([True, False]))


def test_errors_share_a_base_class():
    for name in polytask.errors.__all__:
        assert issubclass(getattr(polytask.errors, name), PolytaskError)


def test_method_is_not_called_directly():
    with pytest.raises(TypeError, match="backward"):
        polytask.methods.create("ew", 2)(torch.ones(2))


def test_ew_fixed_weights():
    problem = tiny_problem(2)
    losses, _ = problem.forward()
    jac = problem.task_jacobian()
    m = polytask.methods.create("ew", 2, weights=[0.25, 2.0])
    result = m.backward(losses, shared_params=problem.shared())
    shared = torch.cat([p.grad.reshape(-1) for p in problem.shared()])
    torch.testing.assert_close(shared, torch.tensor([0.25, 2.0], dtype=jac.dtype) @ jac)
    assert result.weights.tolist() == [0.25, 2.0]
    with pytest.raises(ValueError, match="non-negative"):
        polytask.methods.create("ew", 2, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="expected num_tasks=2"):
        polytask.methods.create("ew", 2, weights=[1.0])


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "positive"),
        (-3.0, "positive"),
        (True, "a number"),
        (torch.tensor([1.0, 2.0]), r"shape \(3,\)"),
        (torch.tensor([1.0, -1.0, 2.0]), "non-negative"),
        ([1.0, float("nan"), 2.0], "finite"),
    ],
)
def test_num_samples_is_checked(value, message):
    problem = tiny_problem(3, seed=0)
    losses, _ = problem.forward()
    method = polytask.methods.create("ew", 3)
    with pytest.raises(InvalidContextError, match=message):
        method.backward(losses, shared_params=problem.shared(), num_samples=value)


def test_num_samples_is_ignored_on_one_process():
    problem = tiny_problem(3, seed=0)
    expected = []
    for counts in (None, 7, torch.tensor([1.0, 0.0, 5.0])):
        problem.zero_grad()
        losses, _ = problem.forward()
        extra = {} if counts is None else {"num_samples": counts}
        polytask.methods.create("mgda", 3).backward(losses, shared_params=problem.shared(), **extra)
        expected.append([p.grad.clone() for p in problem.shared()])
    for grads in expected[1:]:
        for a, b in zip(expected[0], grads):
            assert torch.equal(a, b)
