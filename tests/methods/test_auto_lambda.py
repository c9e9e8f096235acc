"""Auto-Lambda (Liu et al., TMLR 2022); the look-ahead machinery it shares with MOML is
tested in test_meta.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import polytask
from polytask.errors import (
    InvalidHyperparameterError,
)

from ._meta import (
    hypergradient_by_unrolled_autograd,
    loss_fn,
    make_batch,
    tiny_model,
)


@pytest.mark.parametrize("hessian", ["exact", "finite_difference"])
def test_meta_gradient_is_the_lookahead_gradient_of_all_tasks(hessian):
    """Multi-task setting: d/dlambda sum_k V_k(theta'), against autograd through the
    unrolled step on a tanh network (exact to round-off; the official finite difference
    approximately)."""
    k = 2
    model = tiny_model(k, nonlinear=True)
    train, val = make_batch(k, seed=3), make_batch(k, seed=4)
    method = polytask.methods.create("auto_lambda", k, hessian=hessian)
    weights = method.task_weights().double()
    ones = torch.ones(1, k, dtype=torch.float64)
    expected = hypergradient_by_unrolled_autograd(model, train, val, weights, ones, 0.2)[0]
    got = method.meta_step(model, train, val, loss_fn, inner_lr=0.2).meta_gradient
    tol = dict(rtol=1e-10, atol=1e-12) if hessian == "exact" else dict(rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got, expected, **tol)


def test_primary_tasks_only_enter_the_meta_objective():
    k = 3
    model = tiny_model(k, nonlinear=True)
    train, val = make_batch(k, seed=5), make_batch(k, seed=6)
    method = polytask.methods.create("auto_lambda", k, primary=[1], hessian="exact")
    weights = method.task_weights().double()
    combo = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    expected = hypergradient_by_unrolled_autograd(model, train, val, weights, [combo], 0.1)[0]
    got = method.meta_step(model, train, val, loss_fn, inner_lr=0.1).meta_gradient
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_weights_take_one_adam_step_from_init():
    """Defaults: lambda_k = 0.1 and Adam(lr=1e-4), whose first step is -lr g / (|g| + eps)."""
    k = 2
    method = polytask.methods.create("auto_lambda", k)
    assert method.init == 0.1 and method.meta_lr == 1e-4 and method.hessian == "finite_difference"
    model = tiny_model(k)
    result = method.meta_step(
        model, make_batch(k, seed=1), make_batch(k, seed=2), loss_fn, inner_lr=0.1
    )
    g = result.meta_gradient.float()
    expected = 0.1 - 1e-4 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(result.weights, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(method.lambdas.detach(), expected)
    assert method.lambdas.grad is None


def test_helpful_auxiliary_gains_weight_and_harmful_one_loses_it():
    """Auxiliary learning: task 0 is primary; task 1 has the same targets on other inputs
    (helps), task 2 the opposite targets (hurts). After a few joint meta + training steps the
    helpful task's lambda rose above its start and the harmful task's fell below."""
    k = 3
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"encoder": nn.Linear(3, 1, bias=False), "heads": nn.ModuleList([nn.Identity()] * k)}
    ).double()
    nn.init.zeros_(model["encoder"].weight)
    method = polytask.methods.create("auto_lambda", k, primary=[0], meta_lr=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(20):
        train = make_batch(k, seed=10 + step, signs=[1.0, 1.0, -1.0])
        val = make_batch(k, seed=1000 + step, signs=[1.0, 1.0, -1.0])
        method.meta_step(model, train, val, loss_fn, inner_optimizer=optimizer)
        optimizer.zero_grad()
        method.backward(loss_fn(model, train), shared_params=model.parameters())
        optimizer.step()
    lam = method.task_weights()
    assert lam[1] > 0.1 + 0.05 and lam[2] < 0.1 - 0.05, lam


def test_state_dict_round_trip_continues_identically():
    """lambda and the meta optimizer's Adam moments travel in the state_dict."""
    k = 2
    model = tiny_model(k)
    original = polytask.methods.create("auto_lambda", k, meta_lr=1e-2)
    for s in range(2):
        batches = make_batch(k, seed=s), make_batch(k, seed=50 + s)
        original.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("auto_lambda", k, meta_lr=1e-2, init=5.0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    batches = make_batch(k, seed=7), make_batch(k, seed=8)
    a = original.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    b = restored.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    assert torch.equal(a.weights, b.weights)


def test_backward_uses_the_current_weights_and_leaves_them_without_grad():
    k = 2
    model = tiny_model(k)
    method = polytask.methods.create("auto_lambda", k, init=0.4)
    result = method.backward(
        loss_fn(model, make_batch(k, seed=0)), shared_params=model["encoder"].parameters()
    )
    torch.testing.assert_close(result.weights, torch.full((k,), 0.4, dtype=torch.float64))
    assert method.lambdas.grad is None
    assert method.needs_meta_step and not method.meta_step_replaces_step


def test_reported_weights_do_not_follow_later_meta_steps():
    """In float32 (the lambdas' dtype) the weights backward reports are a copy: the next meta
    step moves lambda in place, not the record of the step already taken."""
    k = 2
    model = tiny_model(k).float()
    x, ys = make_batch(k, seed=0)
    batch = x.float(), [y.float() for y in ys]
    method = polytask.methods.create("auto_lambda", k, init=0.4, meta_lr=0.1)
    result = method.backward(loss_fn(model, batch), shared_params=model["encoder"].parameters())
    method.meta_step(model, batch, batch, loss_fn, inner_lr=0.1)
    assert not torch.equal(method.lambdas.detach(), torch.full((k,), 0.4))
    assert torch.equal(result.weights, torch.full((k,), 0.4))


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        (dict(primary=[2]), r"2 is not a task index in \[0, 1\]"),
        (dict(primary=[0, 0]), "repeats task 0"),
        (dict(primary=[]), "names no task"),
        (dict(primary="0"), "sequence of task indices"),
        (dict(meta_lr=0.0), "meta_lr=0.0"),
        (dict(hessian="newton"), "hessian='newton'"),
        (dict(init=float("inf")), "init=inf"),
    ],
)
def test_bad_hyperparameters(hparams, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("auto_lambda", 2, **hparams)
