"""RotoGrad (Javaloy & Valera, ICLR 2022): rotations, magnitude rule, rotation objective."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import polytask
from polytask.errors import InvalidHyperparameterError
from polytask.methods.rotograd import RotoGradRotation

from ._helpers import random_jacobian, tiny_problem


def _magnitude_reference(jac: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """The paper's rule: sum_k C g_k/||g_k||, C = sum_k alpha_k ||g_k||, alpha from g^0."""
    norms = np.linalg.norm(jac, axis=1)
    ratios = norms / np.linalg.norm(initial, axis=1)
    alphas = ratios / ratios.sum()
    c = float(alphas @ norms)
    return sum(c * jac[k] / norms[k] for k in range(len(jac)))


def test_rotations_are_orthogonal_and_start_at_identity():
    rot = RotoGradRotation(3, 5)
    torch.testing.assert_close(rot.matrices(), torch.eye(5).expand(3, 5, 5))
    with torch.no_grad():
        rot.generator_params.normal_(0, 2.0)
    r = rot.matrices().double()
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(r), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_rotate_applies_r_k_and_does_not_train_r():
    rot = RotoGradRotation(2, 4).double()
    with torch.no_grad():
        rot.generator_params.normal_()
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    outs = rot(z)
    r = rot.matrices()
    for k in range(2):
        torch.testing.assert_close(outs[k], z @ r[k].T)
    sum(o.sum() for o in outs).backward()
    assert rot.generator_params.grad is None and z.grad is not None
    with pytest.raises(ValueError, match="size 4"):
        rot(torch.randn(2, 3))


def test_magnitude_rule_follows_the_paper():
    """Every task's scaled gradient has norm C; alpha_k uses the first step's norms."""
    k = 3
    j0 = random_jacobian(k, 12, seed=0)
    j1 = random_jacobian(k, 12, seed=1) * torch.tensor([[0.1], [1.0], [5.0]], dtype=torch.float64)
    m = polytask.methods.create("rotograd", k)
    torch.testing.assert_close(
        m.aggregate(j0).numpy(), _magnitude_reference(j0.numpy(), j0.numpy())
    )
    d1 = m.aggregate(j1)
    np.testing.assert_allclose(d1.numpy(), _magnitude_reference(j1.numpy(), j0.numpy()), rtol=1e-12)
    # The scaled rows C g_k / ||g_k|| all have the same norm C.
    scales = m._aggregate(j1).extras["scales"]  # (a third step, same reference norms)
    scaled_norms = (scales[:, None] * j1).norm(dim=1)
    torch.testing.assert_close(scaled_norms, scaled_norms[0].expand(k))


def test_burn_in_retakes_the_reference_norms():
    k = 2
    js = [random_jacobian(k, 6, seed=s) * (s + 1) for s in range(4)]
    m = polytask.methods.create("rotograd", k, burn_in_period=2)
    outs = [m.aggregate(j) for j in js]
    # Steps 0, 1 refer to js[0]; step 2 re-takes the references from js[2].
    np.testing.assert_allclose(outs[1].numpy(), _magnitude_reference(js[1].numpy(), js[0].numpy()))
    np.testing.assert_allclose(outs[3].numpy(), _magnitude_reference(js[3].numpy(), js[2].numpy()))


def _rotated_problem(k=2, d=5, seed=0):
    problem = tiny_problem(k, seed=seed)
    method = polytask.methods.create("rotograd", k, latent_size=d)
    with torch.no_grad():
        method.rotation.generator_params.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return problem, method


def _rotated_losses(problem, method):
    z = problem.encoder(problem.x)
    zs = method.rotate(z)
    losses = torch.stack(
        [((h(zk) - y) ** 2).mean() for h, zk, y in zip(problem.heads, zs, problem.ys)]
    )
    return losses, z


def test_backward_step_gives_rotations_the_objective_gradient():
    k, d = 2, 5
    problem, method = _rotated_problem(k, d)
    losses, z = _rotated_losses(problem, method)
    # Independent computation: g_k = dL_k/dz, v = mean_k g_k ||gbar|| / ||g_k||, and the
    # objective sum_k mean_n ||R_k v_n - sg(R_k g_k)_n||^2 differentiated by autograd.
    g = torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0] for i in range(k)])
    gbar_norm = g.mean(0).norm()
    v = sum(g[i] * gbar_norm / g[i].norm() for i in range(k)) / k
    params = method.rotation.generator_params
    r = method.rotation.matrices().double()
    objective = sum(((v @ r[i].T - g[i] @ r[i].detach().T) ** 2).sum(-1).mean() for i in range(k))
    (expected,) = torch.autograd.grad(objective, params)

    result = method.backward(losses, shared_params=problem.shared(), features=z, mode="features")
    assert params.grad is not None and params.grad.abs().sum() > 0
    torch.testing.assert_close(params.grad, expected.to(params.dtype), rtol=1e-4, atol=1e-7)
    assert result.weights is None
    # The encoder gets the magnitude-homogenised feature gradient, the heads their own.
    direction = torch.as_tensor(
        _magnitude_reference(g.reshape(k, -1).numpy(), g.reshape(k, -1).numpy())
    )
    (enc_grads) = torch.autograd.grad(
        problem.encoder(problem.x), problem.shared(), grad_outputs=direction.view_as(z)
    )
    for p, e in zip(problem.shared(), enc_grads):
        torch.testing.assert_close(p.grad, e)
    for i, head in enumerate(problem.heads):
        losses_again, _ = _rotated_losses(problem, method)
        own = torch.autograd.grad(losses_again[i], list(head.parameters()))
        for p, e in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, e)


def test_training_the_rotations_aligns_the_task_gradients_and_keeps_them_orthogonal():
    k, d = 2, 5
    problem, method = _rotated_problem(k, d, seed=2)
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    values, cosines = [], []
    for _ in range(40):
        opt.zero_grad()
        for p in problem.parameters():
            p.grad = None
        losses, z = _rotated_losses(problem, method)
        g = torch.stack(
            [torch.autograd.grad(losses[i], z, retain_graph=True)[0].reshape(-1) for i in range(k)]
        )
        cosines.append(float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)))
        result = method.backward(
            losses, shared_params=problem.shared(), features=z, mode="features"
        )
        values.append(result.extras["rotation_loss"])
        opt.step()
    # The objective falls and the task gradients w.r.t. z (R_k^T grad_{r_k} L_k) align.
    assert values[-1] < 0.8 * values[0]
    assert cosines[-1] > cosines[0] + 0.2
    r = method.rotation.matrices().double()
    eye = torch.eye(d, dtype=torch.float64).expand(k, d, d)
    torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=1e-5, rtol=0)


def test_params_mode_is_a_clear_error():
    problem, method = _rotated_problem()
    losses, z = _rotated_losses(problem, method)
    with pytest.raises(ValueError, match="mode='features'"):
        method.backward(losses, shared_params=problem.shared())
    with pytest.raises(ValueError, match=r"latent_size=4 but features have shape \(12, 5\)"):
        polytask.methods.create("rotograd", 2, latent_size=4).backward(
            losses, shared_params=problem.shared(), features=z, mode="features"
        )


def test_state_round_trip_with_lazily_created_rotations():
    k = 2
    problem = tiny_problem(k)
    method = polytask.methods.create("rotograd", k)
    with pytest.warns(UserWarning, match="latent_size=5"):
        for _ in range(2):
            losses, z = _rotated_losses(problem, method)
            method.backward(losses, shared_params=problem.shared(), features=z, mode="features")
    with torch.no_grad():
        method.rotation.generator_params.add_(0.3)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    restored = polytask.methods.create("rotograd", k)
    restored.load_state_dict(torch.load(buf))
    torch.testing.assert_close(restored.rotation.matrices(), method.rotation.matrices())
    torch.testing.assert_close(restored.initial_norms, method.initial_norms)
    assert int(restored.counter) == 2
    jac = random_jacobian(k, 10, seed=5)
    torch.testing.assert_close(restored.aggregate(jac), method.aggregate(jac), rtol=0, atol=0)


@pytest.mark.parametrize(("hparam", "value"), [("latent_size", 0), ("burn_in_period", -1)])
def test_invalid_hyperparameters_are_named(hparam, value):
    with pytest.raises(InvalidHyperparameterError, match=f"{hparam}="):
        polytask.methods.create("rotograd", 2, **{hparam: value})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rotation_size": 3}, "rotation_size=3 needs latent_size"),
        ({"latent_size": 4, "rotation_size": 5}, "rotation_size=5 must be at most"),
        ({"latent_size": 4, "rotation_size": 0}, "rotation_size=0 must be a positive"),
    ],
)
def test_invalid_rotation_size_is_named(kwargs, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("rotograd", 2, **kwargs)


def test_a_smaller_rotation_turns_the_leading_coordinates_only():
    """rotation_size=m: R_k (m x m) rotates z's first m coordinates and leaves the rest
    (the official code's rotation smaller than the representation); the rotation objective
    is the full one's with R_k = diag(R_k^m, I), whose gradient is the m x m block's."""
    k, d, m = 2, 5, 3
    problem = tiny_problem(k, seed=1)
    method = polytask.methods.create("rotograd", k, latent_size=d, rotation_size=m)
    assert method.rotation.generator_params.shape == (k, m, m)
    with torch.no_grad():
        method.rotation.generator_params.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    z = problem.encoder(problem.x)
    r = method.rotation.matrices().double()
    for zk, rk in zip(method.rotate(z), r):
        torch.testing.assert_close(zk[:, :m], z[:, :m] @ rk.T)
        torch.testing.assert_close(zk[:, m:], z[:, m:])
    # Independent objective: the full d x d rotation with an identity block.
    losses, z = _rotated_losses(problem, method)
    g = torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0] for i in range(k)])
    gbar_norm = g.mean(0).norm()
    v = sum(g[i] * gbar_norm / g[i].norm() for i in range(k)) / k
    params = method.rotation.generator_params
    full = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    full[:, :m, :m] = method.rotation.matrices().double()
    objective = sum(
        ((v @ full[i].T - g[i] @ full[i].detach().T) ** 2).sum(-1).mean() for i in range(k)
    )
    (expected,) = torch.autograd.grad(objective, params)
    result = method.backward(losses, shared_params=problem.shared(), features=z, mode="features")
    torch.testing.assert_close(params.grad, expected.to(params.dtype), rtol=1e-4, atol=1e-7)
    assert result.extras["rotation_loss"] == pytest.approx(float(objective.detach()), rel=1e-5)
    # m = d is the full rotation.
    assert polytask.methods.create("rotograd", k, latent_size=d, rotation_size=d).rotation.size == d


def test_backward_on_a_tiny_model_features_mode():
    """The plain tiny model (heads read z directly) runs in features mode, K = 3."""
    k = 3
    problem = tiny_problem(k)
    method = polytask.methods.create("rotograd", k, latent_size=5)
    losses, features = problem.forward()
    result = method.backward(
        losses, shared_params=problem.shared(), features=features, mode="features"
    )
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in problem.parameters())
    assert result.extras["scales"].shape == (k,)
    assert isinstance(method.rotation, nn.Module)
    assert sum(p.numel() for p in method.parameters()) == k * 5 * 5
