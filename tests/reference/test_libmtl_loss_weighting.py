"""Differential tests of the loss weightings against LibMTL 1.1.5: UW, DWA, RLW and GLS.

LibMTL's weightings run in :class:`._helpers.LibMTLHost` (one shared parameter x at 0,
losses L_k = <J_k, x> + c_k, so the task gradients are the rows of J and the loss values are
c); polytask gets the same losses through ``method.backward``. Everything is float64 except
polytask's UW log-variances (float32 parameters, hence the 1e-6 tolerances there).
LSB, DTP have no LibMTL counterpart in 1.1.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ._helpers import assert_rel_close, make_method, polytask_backward, random_jacobian


def _losses(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.2


# ---------------------------------------------------------------------------------------
# UW: LibMTL minimises sum_k L_k / (2 e^{s_k}) + s_k / 2 (the regression form for every
# task) from s = -0.5; polytask's default form is the same, started at the same s here.


@pytest.mark.parametrize("k", [2, 3, 10])
def test_uw_matches_libmtl_over_several_steps(libmtl_host, k):
    host = libmtl_host("UW", k, 20)
    uw = make_method("uw", k, init_log_variance=-0.5)
    lr = 0.3
    for step in range(4):
        jac = random_jacobian(k, 20, seed=10 * k + step)
        losses = _losses(k, 10 * k + step)
        ref, ref_w = host.run(jac, losses)
        ours, result = polytask_backward(uw, jac, losses)
        assert_rel_close(ours, ref, 1e-6, f"uw update, step {step}")
        assert_rel_close(result.weights, torch.as_tensor(ref_w), 1e-6, "uw weights")
        ref_s = host.host.loss_scale
        assert_rel_close(uw.log_variance.grad, ref_s.grad, 1e-6, "uw log-variance gradient")
        # One SGD step on s in both (x stays at 0: only the losses change).
        with torch.no_grad():
            ref_s -= lr * ref_s.grad
            uw.log_variance -= lr * uw.log_variance.grad
        ref_s.grad = None
        uw.log_variance.grad = None
        assert_rel_close(uw.log_variance.detach(), ref_s.detach(), 1e-6, "uw log-variances")


# ---------------------------------------------------------------------------------------
# DWA: LibMTL reads the epoch-average training losses from its trainer's
# train_loss_buffer[:, epoch]; polytask averages the losses it sees in each epoch itself.


@pytest.mark.parametrize("k", [2, 3, 10])
def test_dwa_matches_libmtl_epoch_by_epoch(libmtl_host, k):
    epochs, steps = 5, 3
    host = libmtl_host("DWA", k, 15, kwargs={"T": 2.0}, train_loss_buffer=np.zeros((k, epochs)))
    dwa = make_method("dwa", k)
    for epoch in range(epochs):
        host.host.epoch = epoch
        seen = []
        for s in range(steps):
            jac = random_jacobian(k, 15, seed=100 * epoch + s)
            # Losses that fall at task-dependent rates, with per-step noise.
            rate = torch.linspace(0.5, 0.95, k, dtype=torch.float64) ** epoch
            losses = rate * _losses(k, 100 * epoch + s)
            ref, ref_w = host.run(jac, losses)
            ours, result = polytask_backward(dwa, jac, losses, epoch=epoch)
            assert_rel_close(ours, ref, 1e-12, f"dwa update, epoch {epoch}")
            np.testing.assert_allclose(result.weights.numpy(), ref_w, rtol=1e-12)
            seen.append(losses)
        # What LibMTL's trainer records at the end of the epoch: the mean training loss.
        host.host.train_loss_buffer[:, epoch] = torch.stack(seen).mean(0).numpy()
    assert not np.allclose(ref_w, 1.0)  # the last epochs did reweight


# ---------------------------------------------------------------------------------------
# RLW: LibMTL 1.1.5 samples with torch.distributions from the global generator; for
# 'Normal' and 'Uniform' those draws are exactly torch.randn / torch.rand, so a global seed
# and polytask's seed give the same stream and the same updates. 'Dirichlet' and
# 'Bernoulli' draw from different streams: there we check the same transformation.


@pytest.mark.parametrize(("ours", "theirs"), [("normal", "Normal"), ("uniform", "Uniform")])
@pytest.mark.parametrize("k", [2, 3, 10])
def test_rlw_matches_libmtl_under_the_same_seed(libmtl_host, k, ours, theirs):
    host = libmtl_host("RLW", k, 12, kwargs={"dist": theirs})
    rlw = make_method("rlw", k, distribution=ours, seed=17)
    torch.manual_seed(17)
    for step in range(3):
        jac = random_jacobian(k, 12, seed=step)
        losses = _losses(k, step)
        ref, ref_w = host.run(jac, losses)
        got, result = polytask_backward(rlw, jac, losses)
        np.testing.assert_array_equal(result.weights.numpy(), ref_w)
        assert_rel_close(got, ref, 1e-14, f"rlw {ours} update")


def _simplex_preimage(w: torch.Tensor) -> torch.Tensor:
    """The z with sum(z) = 1 and softmax(z) = w."""
    logw = torch.log(w)
    return logw - logw.mean(-1, keepdim=True) + 1.0 / w.shape[-1]


def test_rlw_dirichlet_is_the_softmax_of_a_simplex_draw_as_in_libmtl(libmtl_host):
    k, n = 3, 200
    host = libmtl_host("RLW", k, 6, kwargs={"dist": "Dirichlet"})
    rlw = make_method("rlw", k, distribution="dirichlet", seed=1)
    torch.manual_seed(1)
    jac = random_jacobian(k, 6, seed=0)
    theirs, ours = [], []
    for _ in range(n):
        ref, ref_w = host.run(jac)
        assert_rel_close(ref, torch.as_tensor(ref_w) @ jac, 1e-12, "LibMTL's own update")
        got, result = polytask_backward(rlw, jac)
        assert_rel_close(got, result.weights @ jac, 1e-12, "polytask's update")
        theirs.append(torch.as_tensor(ref_w))
        ours.append(result.weights)
    for w in (torch.stack(theirs), torch.stack(ours)):
        z = _simplex_preimage(w)
        assert float(z.min()) >= -1e-12  # softmax of a point of the simplex
        # Dir(1, ..., 1): E[z_k] = 1/K.
        torch.testing.assert_close(
            z.mean(0), torch.full((k,), 1 / k, dtype=w.dtype), atol=0.05, rtol=0
        )


def test_rlw_bernoulli_has_libmtls_support(libmtl_host):
    k, n = 3, 200
    host = libmtl_host("RLW", k, 6, kwargs={"dist": "Bernoulli"})
    rlw = make_method("rlw", k, distribution="bernoulli", seed=2)
    torch.manual_seed(2)
    jac = random_jacobian(k, 6, seed=1)
    for name, run in (("LibMTL", lambda: host.run(jac)), ("polytask", lambda: _ours(rlw, jac))):
        rows = []
        for _ in range(n):
            update, w = run()
            w = torch.as_tensor(w)
            assert_rel_close(update, w @ jac, 1e-12, f"{name} Bernoulli update")
            rows.append(w)
        w = torch.stack(rows)
        assert set(w.unique().tolist()) == {0.0, 1.0}, name  # raw 0/1, not normalised
        assert bool((w.sum(1) >= 1).all()), name  # all-zero draws are redrawn


def _ours(method, jac):
    update, result = polytask_backward(method, jac)
    return update, result.weights


def test_rlw_constrained_bernoulli_works_where_libmtl_fails(libmtl_host):
    """LibMTL 1.1.5's RLW lists 'constrained_Bernoulli' but calls ``random.sample`` without
    importing ``random``; the NameError falls into its fallback, which raises ValueError.
    polytask implements the paper's distribution: one task, chosen uniformly, per step."""
    host = libmtl_host("RLW", 3, 6, kwargs={"dist": "constrained_Bernoulli"})
    with pytest.raises(ValueError, match="No support"):
        host.run(random_jacobian(3, 6, seed=0))
    _, w = _ours(
        make_method("rlw", 3, distribution="constrained_bernoulli", seed=0),
        random_jacobian(3, 6, seed=0),
    )
    assert sorted(w.tolist()) == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------
# GLS: the same objective (prod_k L_k)^(1/K) and so the same update. LibMTL 1.1.5 reports
# L_k / (K prod_j L_j) as the weights, which is not the factor its update applies to g_k
# (that is G / (K L_k), the derivative of the geometric mean G): polytask reports the
# effective weights, the ones that reproduce the update.


@pytest.mark.parametrize("k", [2, 3, 10])
def test_gls_matches_libmtls_update_and_reports_the_effective_weights(libmtl_host, k):
    jac = random_jacobian(k, 25, seed=k)
    losses = _losses(k, k)
    ref, ref_w = host_run = libmtl_host("GLS", k, 25).run(jac, losses)
    del host_run
    ours, result = polytask_backward(make_method("gls", k), jac, losses)
    assert_rel_close(ours, ref, 1e-12, "gls update vs LibMTL")
    geometric_mean = losses.prod() ** (1 / k)
    assert_rel_close(result.weights, geometric_mean / (k * losses), 1e-12, "gls weights")
    assert_rel_close(result.weights @ jac, ref, 1e-12, "our weights reproduce LibMTL's update")
    ref_w = torch.as_tensor(ref_w)
    assert_rel_close(ref_w, losses / (k * losses.prod()), 1e-12, "LibMTL's reported weights")
    assert float((ref_w @ jac - ref).norm()) > 1e-3 * float(ref.norm())
