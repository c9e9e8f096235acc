"""MOML (Ye et al., NeurIPS 2021): hyper-gradients through the look-ahead, MGDA upper level."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError

from ._meta import (
    hypergradient_by_unrolled_autograd,
    linear_model,
    loss_fn,
    make_batch,
    tiny_model,
)


def _softmax_jacobian(lam: np.ndarray) -> np.ndarray:
    return np.diag(lam) - np.outer(lam, lam)


def test_hypergradients_in_closed_form_on_linear_regression():
    """Every task reads f(x) = x @ a + b; with X1 = [x, 1], grad L_i = 2/n X1^T (X1 t - y_i),
    theta' = t - alpha sum_i lambda_i grad L_i and dV_k/dlambda_i = -alpha <grad V_k(theta'),
    grad L_i(t)>; dV_k/ds = (dV_k/dlambda) (diag(lambda) - lambda lambda^T)."""
    k, alpha = 3, 0.1
    model = linear_model(k)
    train = make_batch(k, seed=1, signs=[1.0, 0.5, -1.0])
    val = make_batch(k, seed=2, signs=[1.0, 0.5, -1.0])
    method = polytask.methods.create("moml", k)
    lam = torch.softmax(method.logits.detach().double(), 0).numpy()

    def design(x):
        return np.hstack([x.numpy(), np.ones((x.shape[0], 1))])

    t = np.concatenate(
        [model["encoder"].weight.detach().numpy()[0], model["encoder"].bias.detach()]
    )
    x1, v1 = design(train[0]), design(val[0])
    gl = np.stack([2 / len(x1) * x1.T @ (x1 @ t - y.numpy()[:, 0]) for y in train[1]])
    t2 = t - alpha * lam @ gl
    gv = np.stack([2 / len(v1) * v1.T @ (v1 @ t2 - y.numpy()[:, 0]) for y in val[1]])
    expected = (-alpha * gv @ gl.T) @ _softmax_jacobian(lam)

    result = method.meta_step(model, train, val, loss_fn, inner_lr=alpha)
    np.testing.assert_allclose(result.extras["hypergradients"].numpy(), expected, rtol=1e-9)
    want_val = [np.mean((v1 @ t2 - y.numpy()[:, 0]) ** 2) for y in val[1]]
    np.testing.assert_allclose(result.val_losses.numpy(), want_val, rtol=1e-12)


@pytest.mark.parametrize("hessian", ["exact", "finite_difference"])
def test_hypergradients_match_unrolled_autograd_on_a_nonlinear_model(hessian):
    """Independent: autograd through the unrolled step with create_graph (the official code's
    way), per validation task, then the softmax chain rule by autograd as well."""
    k, alpha = 3, 0.2
    model = tiny_model(k, nonlinear=True)
    train, val = make_batch(k, seed=3), make_batch(k, seed=4)
    method = polytask.methods.create("moml", k, hessian=hessian)
    s = method.logits.detach().double().requires_grad_()
    lam = torch.softmax(s, 0)
    d_lam = hypergradient_by_unrolled_autograd(model, train, val, lam, torch.eye(k).double(), alpha)
    expected = torch.stack(
        [torch.autograd.grad(lam, s, row, retain_graph=True)[0] for row in d_lam]
    )
    got = method.meta_step(model, train, val, loss_fn, inner_lr=alpha).extras["hypergradients"]
    tol = dict(rtol=1e-9, atol=1e-12) if hessian == "exact" else dict(rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("normalization", ["l2", "none", "loss", "loss+"])
def test_upper_level_is_mgda_on_the_normalised_hypergradients(normalization):
    """gamma satisfies the min-norm KKT conditions on the normalised hyper-gradients
    (M gamma >= gamma^T M gamma, equal on the support) and the meta-gradient applies it to the
    raw ones, as the official code does by back-propagating sum_k gamma_k V_k."""
    k = 3
    model = tiny_model(k, nonlinear=True)
    train = make_batch(k, seed=5, signs=[1.0, -1.0, 0.3])
    val = make_batch(k, seed=6, signs=[1.0, -1.0, 0.3])
    method = polytask.methods.create("moml", k, normalization=normalization)
    result = method.meta_step(model, train, val, loss_fn, inner_lr=0.1)
    grads, gamma = result.extras["hypergradients"], result.extras["mgda_weights"]
    norms = grads.norm(dim=1)
    scale = {
        "l2": norms,
        "none": torch.ones_like(norms),
        "loss": result.val_losses,
        "loss+": result.val_losses * norms,
    }[normalization]
    scaled = grads / scale[:, None]
    m = scaled @ scaled.T
    assert torch.all(gamma >= 0) and abs(float(gamma.sum()) - 1) < 1e-12
    value, slack = gamma @ m @ gamma, m @ gamma
    tol = 1e-8 * float(m.diagonal().max())
    assert torch.all(slack >= value - tol)
    assert torch.all((gamma <= 1e-12) | (slack <= value + tol))
    torch.testing.assert_close(result.meta_gradient, gamma @ grads)


def test_weights_sum_to_one_and_start_uniform():
    method = polytask.methods.create("moml", 4)
    torch.testing.assert_close(method.task_weights(), torch.full((4,), 0.25))
    assert method.meta_lr == 1e-4 and method.normalization == "l2" and method.hessian == "exact"


def test_task_with_corrupted_training_labels_loses_weight():
    """Task 2's training labels are the negatives of its validation labels: training on it
    raises its own validation loss and, through the shared layer, the others'. Every upper
    objective asks for less of it, so its softmax weight falls and the others' rise."""
    k = 3
    model = linear_model(k)
    method = polytask.methods.create("moml", k, meta_lr=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(15):
        train = make_batch(k, seed=10 + step, signs=[1.0, 1.0, -1.0])
        val = make_batch(k, seed=500 + step)
        method.meta_step(model, train, val, loss_fn, inner_optimizer=optimizer)
        optimizer.zero_grad()
        method.backward(loss_fn(model, train), shared_params=model.parameters())
        optimizer.step()
    lam = method.task_weights()
    assert lam[2] < 1 / 3 - 0.05 and lam[0] > 1 / 3 and lam[1] > 1 / 3, lam


def test_state_dict_round_trip_continues_identically():
    k = 3
    model = tiny_model(k)
    original = polytask.methods.create("moml", k, meta_lr=1e-2)
    for s in range(2):
        original.meta_step(
            model, make_batch(k, seed=s), make_batch(k, seed=9 + s), loss_fn, inner_lr=0.1
        )
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("moml", k, meta_lr=1e-2)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    batches = make_batch(k, seed=20), make_batch(k, seed=21)
    a = original.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    b = restored.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, torch.full((k,), 1 / k))


def test_bad_meta_step_inputs():
    k = 2
    method = polytask.methods.create("moml", k)
    model = tiny_model(k)
    train, val = make_batch(k, seed=0), make_batch(k, seed=1)
    with pytest.raises(ValueError, match="needs val_batch"):
        method.meta_step(model, train, None, loss_fn, inner_lr=0.1)
    with pytest.raises(TypeError, match="Adam"):
        method.meta_step(
            model, train, val, loss_fn, inner_optimizer=torch.optim.Adam(model.parameters())
        )
    with pytest.raises(ValueError, match="2 task losses"):
        method.meta_step(model, train, val, lambda m, b: loss_fn(m, b).sum(), inner_lr=0.1)


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        (dict(normalization="max"), "normalization='max'"),
        (dict(meta_lr=-1.0), "meta_lr=-1.0"),
        (dict(hessian="none"), "hessian='none'"),
    ],
)
def test_bad_hyperparameters(hparams, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("moml", 2, **hparams)
