"""MRN's tensor normal prior and flip-flop covariance updates (Long et al., NeurIPS 2017)."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import InvalidHyperparameterError, PolytaskError
from polytask.regularizers import MRN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spd(n: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64)


def test_identity_covariances_give_the_squared_frobenius_norm():
    w = torch.randn(3, 2, 4)
    assert MRN((3, 2, 4))(w).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_diagonal_covariances_scale_each_entry():
    mrn = MRN((2, 2, 2))
    s = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.5]), torch.tensor([1.0, 8.0])]
    for i, d in enumerate(s):
        getattr(mrn, f"cov{i}").copy_(torch.diag(d))
    w = torch.arange(1.0, 9.0).view(2, 2, 2)
    expected = sum(
        w[i, j, k].item() ** 2 / (s[0][i] * s[1][j] * s[2][k]).item()
        for i in range(2)
        for j in range(2)
        for k in range(2)
    )
    assert mrn(w).item() == pytest.approx(expected)


def test_prior_equals_the_kronecker_quadratic_form():
    mrn = MRN((3, 2, 2)).double()
    covs = [spd(3), spd(2), spd(2)]
    for i, c in enumerate(covs):
        getattr(mrn, f"cov{i}").copy_(c)
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    precision = torch.kron(torch.kron(covs[0].inverse(), covs[1].inverse()), covs[2].inverse())
    v = w.reshape(-1)  # row-major vec matches kron(Sigma_1, Sigma_2, Sigma_3)
    torch.testing.assert_close(mrn(w), v @ precision @ v)


def test_update_from_identity_is_the_scaled_gram_matrix():
    w = torch.randn(3, 2, 4)
    mrn = MRN((3, 2, 4), learn=[0], eps=0.1)
    mrn.update(w)
    w1 = w.reshape(3, 8)
    torch.testing.assert_close(mrn.cov0, w1 @ w1.T / 8 + 0.1 * torch.eye(3))
    torch.testing.assert_close(mrn.cov1, torch.eye(2))


def test_update_matches_the_papers_kronecker_formula():
    mrn = MRN((3, 2, 2), learn=[-1], eps=1e-3).double()
    covs = [spd(3), spd(2), spd(2)]
    for i, c in enumerate(covs):
        getattr(mrn, f"cov{i}").copy_(c)
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    mrn.update(w)
    w3 = w.permute(2, 0, 1).reshape(2, 6)  # task unfolding, columns (d1, d2)
    expected = w3 @ torch.kron(covs[0], covs[1]).inverse() @ w3.T / 6 + 1e-3 * torch.eye(2)
    torch.testing.assert_close(mrn.cov2, expected.to(mrn.cov2))
    torch.testing.assert_close(mrn.cov0, covs[0])


def test_flip_flop_reaches_a_fixed_point():
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    mrn = MRN((4, 3, 3), eps=0.1).double()
    mrn.update(w, sweeps=200)
    before = [c.clone() for c in mrn.covariances()]
    mrn.update(w)
    for b, a in zip(before, mrn.covariances()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        assert bool(torch.linalg.eigvalsh(a).min() > 0)


def test_covariances_are_checkpointed_and_inputs_checked():
    mrn = MRN((2, 2))
    mrn.update(torch.randn(2, 2))
    other = MRN((2, 2))
    other.load_state_dict(mrn.state_dict())
    torch.testing.assert_close(other.cov0, mrn.cov0)
    with pytest.raises(PolytaskError, match=r"\(2, 2\)"):
        mrn(torch.randn(2, 3))
    with pytest.raises(InvalidHyperparameterError, match="learn"):
        MRN((2, 2), learn=[0, 2])
