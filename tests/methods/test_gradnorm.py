"""GradNorm (Chen et al., ICML 2018): dL_grad/dw, renormalisation, L(0), LibMTL, state."""

from __future__ import annotations

import importlib
import importlib.util
import io

import numpy as np
import pytest
import torch
from torch import nn

import polytask
from polytask.errors import InvalidHyperparameterError

from .._libmtl import register_libmtl
from ._helpers import assert_weighted_shared_grad, random_jacobian, tiny_problem


def _linear_losses(jac: torch.Tensor, values: torch.Tensor):
    """Losses L_k = <J_k, x> + c_k at x = 0: their Jacobian is J and their values c."""
    x = torch.zeros(jac.shape[1], dtype=jac.dtype, requires_grad=True)
    return x, jac @ x + values


def _autograd_lgrad_grad(w, jac, losses, l0, alpha, cols=None):
    """dL_grad/dw by autograd on the paper's formula (target held constant)."""
    w = w.detach().clone().to(torch.float64).requires_grad_(True)
    j = jac if cols is None else jac[:, cols]
    g = torch.stack([torch.linalg.vector_norm(w[k] * j[k]) for k in range(len(w))])
    lt = losses / l0
    r = lt / lt.mean()
    target = (g.mean() * r**alpha).detach()
    (grad,) = torch.autograd.grad((g - target).abs().sum(), w)
    return grad


def test_weight_gradient_matches_autograd_on_the_formula():
    k = 3
    jac = random_jacobian(k, 20, seed=3)
    l0 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    lt = torch.tensor([0.7, 1.9, 0.1], dtype=torch.float64)
    m = polytask.methods.create("gradnorm", k, alpha=1.5)
    x, losses = _linear_losses(jac, l0)
    m.backward(losses, shared_params=[x])  # captures L(0)
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([0.5, 1.5, 1.0]))
    m.task_weights.grad = None
    x, losses = _linear_losses(jac, lt)
    result = m.backward(losses, shared_params=[x])
    w = m.task_weights.detach()
    expected = _autograd_lgrad_grad(w, jac, lt, l0, 1.5)
    torch.testing.assert_close(m.task_weights.grad.double(), expected, rtol=1e-6, atol=1e-7)
    # The shared parameters get sum_k w_k g_k, the reported weights are w.
    torch.testing.assert_close(x.grad, w.double() @ jac)
    torch.testing.assert_close(result.weights, w.double())


def test_last_blocks_restricts_the_norms_to_the_last_tensors():
    problem = tiny_problem(2, seed=4)
    shared = problem.shared()  # Linear(6,8) weight, bias, Linear(8,5) weight, bias
    sizes = [p.numel() for p in shared]
    jac = problem.task_jacobian()
    losses0, _ = problem.forward()
    m = polytask.methods.create("gradnorm", 2, last_blocks=2)
    m.backward(losses0, shared_params=shared)
    cols = slice(sum(sizes[:2]), sum(sizes))
    l0 = losses0.detach()
    expected = _autograd_lgrad_grad(torch.ones(2), jac, l0, l0, 1.5, cols)
    torch.testing.assert_close(m.task_weights.grad.double(), expected, rtol=1e-6, atol=1e-7)
    all_cols = polytask.methods.create("gradnorm", 2)
    losses, _ = problem.forward()
    all_cols.backward(losses, shared_params=shared)
    assert not torch.allclose(all_cols.task_weights.grad, m.task_weights.grad)


def test_weights_are_renormalised_to_sum_k_before_use():
    k = 3
    jac = random_jacobian(k, 6, seed=0)
    m = polytask.methods.create("gradnorm", k)
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([2.0, 1.0, 1.0]))
    d = m.aggregate(jac)
    w = torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64)
    torch.testing.assert_close(m.task_weights.double(), w)
    torch.testing.assert_close(d, w @ jac)
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([-1.0, 0.5, 0.4]))
    with pytest.raises(InvalidHyperparameterError, match="sum to"):
        m.aggregate(jac)


def test_initial_losses_are_captured_once():
    jac = random_jacobian(2, 5, seed=1)
    m = polytask.methods.create("gradnorm", 2)
    for values in ([3.0, 4.0], [1.0, 1.0], [0.5, 2.0]):
        x, losses = _linear_losses(jac, torch.tensor(values, dtype=torch.float64))
        m.backward(losses, shared_params=[x])
        torch.testing.assert_close(m.initial_losses, torch.tensor([3.0, 4.0], dtype=torch.float64))
    # aggregate(J) has no losses: it neither learns nor touches L(0).
    m.task_weights.grad = None
    m.aggregate(jac)
    assert m.task_weights.grad is None


def test_an_optimizer_step_moves_weights_towards_equal_training_rates():
    """Task 1's loss fell less (r_1 > 1): its weight must grow, task 0's shrink."""
    jac = torch.eye(2, 4, dtype=torch.float64)  # equal gradient norms
    m = polytask.methods.create("gradnorm", 2, alpha=1.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, losses = _linear_losses(jac, torch.tensor([1.0, 1.0], dtype=torch.float64))
    m.backward(losses, shared_params=[x])
    opt.zero_grad()
    x, losses = _linear_losses(jac, torch.tensor([0.2, 0.8], dtype=torch.float64))
    m.backward(losses, shared_params=[x])
    opt.step()
    m.aggregate(jac)  # renormalises
    w = m.task_weights.detach()
    assert w[1] > 1.0 > w[0]
    assert abs(float(w.sum()) - 2.0) < 1e-6


def _libmtl_gradnorm():
    register_libmtl()
    return importlib.import_module("LibMTL.weighting.GradNorm").GradNorm


def test_weight_gradient_matches_libmtl_through_its_softmax():
    """LibMTL learns s with w = K softmax(s); at any s its s.grad is J_softmax^T dL/dw."""
    k, p = 3, 12
    base = _libmtl_gradnorm()

    class Host(base):
        def get_share_params(self):
            return [self.x]

        def zero_grad_share_params(self):
            self.x.grad.zero_()

    host = Host()
    host.task_num, host.device, host.rep_grad, host.epoch = k, torch.device("cpu"), False, 1
    host.x = nn.Parameter(torch.zeros(p, dtype=torch.float64))
    host.x.grad = torch.zeros(p, dtype=torch.float64)
    host.loss_scale = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    l0 = np.array([1.0, 2.0, 0.5])
    host.train_loss_buffer = l0[:, None]
    jac = random_jacobian(k, p, seed=5)
    lt = torch.tensor([0.9, 1.0, 0.45], dtype=torch.float64)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # LibMTL allocates its gradient buffer by default
    try:
        host.backward(jac @ host.x + lt, alpha=1.5)
    finally:
        torch.set_default_dtype(old_dtype)
    ref_s_grad = host.loss_scale.grad

    m = polytask.methods.create("gradnorm", k, alpha=1.5)
    s = host.loss_scale.detach()
    pk = torch.softmax(s, 0)
    with torch.no_grad():
        m.task_weights.copy_(k * pk)
        m.initial_losses.copy_(torch.as_tensor(l0))
        m.has_initial_losses.fill_(True)
    x, losses = _linear_losses(jac, lt)
    m.backward(losses, shared_params=[x])
    dw = m.task_weights.grad.double()
    chain = k * (torch.diag(pk) - pk[:, None] * pk[None, :])  # dw/ds
    torch.testing.assert_close(chain.T @ dw, ref_s_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(x.grad, host.x.grad, rtol=1e-5, atol=1e-8)


def test_state_round_trip():
    jac = random_jacobian(3, 6, seed=2)
    m = polytask.methods.create("gradnorm", 3, alpha=0.5)
    x, losses = _linear_losses(jac, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    m.backward(losses, shared_params=[x])
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    restored = polytask.methods.create("gradnorm", 3, alpha=0.5)
    restored.load_state_dict(torch.load(buf))
    for method in (m, restored):
        method.task_weights.grad = None
        x, losses = _linear_losses(jac, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
        method.backward(losses, shared_params=[x])
    torch.testing.assert_close(restored.task_weights.grad, m.task_weights.grad, rtol=0, atol=0)
    torch.testing.assert_close(restored.initial_losses, m.initial_losses)


@pytest.mark.parametrize(("hparam", "value"), [("alpha", -1.0), ("last_blocks", 0)])
def test_invalid_hyperparameters_are_named(hparam, value):
    with pytest.raises(InvalidHyperparameterError, match=f"{hparam}="):
        polytask.methods.create("gradnorm", 2, **{hparam: value})


@pytest.mark.parametrize("mode", ["params", "features"])
def test_backward_on_a_tiny_model(mode):
    k = 3
    problem = tiny_problem(k)
    m = polytask.methods.create("gradnorm", k)
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    balanced = problem.task_jacobian(mode)
    result = problem.backward(m, mode)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(result.weights, w)
    assert_weighted_shared_grad(problem, w)
    # First step: r = 1, so the target is mean(G) with G_k = w_k ||g_k||.
    l0 = problem.forward()[0].detach()  # the losses the backward saw (the model is unchanged)
    expected = _autograd_lgrad_grad(w, balanced, l0, l0, 1.5)
    torch.testing.assert_close(m.task_weights.grad.double(), expected, rtol=1e-6, atol=1e-7)
