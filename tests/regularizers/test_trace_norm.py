"""Tensor trace norms (Yang & Hospedales, ICLR-W 2017) on hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import InvalidHyperparameterError, PolytaskError
from polytask.regularizers import nuclear_norm, trace_norm, trace_norm_terms


def rank_one() -> tuple[torch.Tensor, float]:
    a, b, c = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    # every unfolding of a (x) b (x) c is rank one, with nuclear norm |a| |b| |c| = 3 * 5 * 1
    return torch.einsum("i,j,k->ijk", a, b, c), 15.0


def test_nuclear_norm_is_the_sum_of_singular_values():
    m = torch.tensor([[3.0, 0.0], [4.0, 5.0]])  # singular values sqrt(45), sqrt(5)
    assert nuclear_norm(m).item() == pytest.approx(45**0.5 + 5**0.5)


def test_matrix_case():
    w = torch.tensor([[3.0, 0.0], [0.0, -4.0]])  # two tasks, columns
    assert trace_norm(w, "laf").item() == pytest.approx(7.0)
    assert trace_norm(w, "tucker").item() == pytest.approx(14.0)
    assert trace_norm(w, "tt").item() == pytest.approx(7.0)


@pytest.mark.parametrize(("kind", "terms"), [("laf", 1), ("tucker", 3), ("tt", 2)])
def test_rank_one_tensor(kind, terms):
    w, norm = rank_one()
    torch.testing.assert_close(trace_norm_terms(w, kind), torch.full((terms,), norm))
    per_task = [w[..., k] for k in range(w.shape[-1])]
    assert trace_norm(per_task, kind).item() == pytest.approx(terms * norm)


def test_gammas_weight_the_terms():
    w, norm = rank_one()
    assert trace_norm(w, "tucker", gammas=[1.0, 0.0, 2.0]).item() == pytest.approx(3 * norm)
    with pytest.raises(InvalidHyperparameterError, match="3 finite non-negative"):
        trace_norm(w, "tucker", gammas=[1.0, 1.0])
    with pytest.raises(InvalidHyperparameterError, match="'cp'"):
        trace_norm(w, "cp")


def test_gradient_is_u_v_transpose():
    w = torch.tensor([[3.0, 0.0], [0.0, -4.0]], requires_grad=True)
    trace_norm(w, "laf").backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_bad_inputs():
    with pytest.raises(PolytaskError, match="one shape"):
        trace_norm([torch.zeros(2, 3), torch.zeros(3, 2)])
    with pytest.raises(PolytaskError, match="task axis"):
        trace_norm(torch.zeros(3))
