"""DMTRL tensor-factorised layers (Yang & Hospedales, ICLR 2017) with given factors."""

from __future__ import annotations

import itertools

import pytest
import torch

from polytask.errors import InvalidHyperparameterError, PolytaskError
from polytask.regularizers import DMTRLLinear, TensorFactorisedWeights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_laf_weights_are_the_basis_times_the_task_vector():
    m = TensorFactorisedWeights((2, 3), ["a", "b"], method="laf", rank=2)
    for t in m.tasks:
        expected = (m.basis @ m.task_factors[t]).view(2, 3)
        torch.testing.assert_close(m.weight(t), expected)


def test_tucker_weights_by_the_definition():
    m = TensorFactorisedWeights((2, 3), ["a", "b"], method="tucker", rank=[2, 2, 2])
    u1, u2 = m.factors
    for t in m.tasks:
        w = torch.zeros(2, 3)
        for i, j, a, b, c in itertools.product(range(2), range(3), range(2), range(2), range(2)):
            w[i, j] += m.core[a, b, c] * u1[i, a] * u2[j, b] * m.task_factors[t][c]
        torch.testing.assert_close(m.weight(t), w)


def test_tensor_train_weights_by_the_definition():
    m = TensorFactorisedWeights((2, 3), ["a", "b"], method="tt", rank=[2, 2])
    g1, g2 = m.cores
    for t in m.tasks:
        w = torch.zeros(2, 3)
        for i, j, a, b in itertools.product(range(2), range(3), range(2), range(2)):
            w[i, j] += g1[0, i, a] * g2[a, j, b] * m.task_factors[t][b]
        torch.testing.assert_close(m.weight(t), w)


@pytest.mark.parametrize("method", ["laf", "tucker", "tt"])
def test_full_rank_decomposition_reproduces_the_weights(method):
    w = torch.randn(3, 2, 4, dtype=torch.float64)
    m = TensorFactorisedWeights.from_weights(w, method=method, rank=100)
    torch.testing.assert_close(m.stacked(), w)


def test_truncated_laf_is_the_best_low_rank_fit():
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    m = TensorFactorisedWeights.from_weights(w, method="laf", rank=1)
    s = torch.linalg.svdvals(w.reshape(12, 3))
    residual = torch.linalg.norm(m.stacked() - w)
    torch.testing.assert_close(residual, s[1:].pow(2).sum().sqrt())  # Eckart-Young


def test_linear_layer_uses_the_last_row_as_bias():
    layer = DMTRLLinear(3, 2, ["a", "b"], method="tt", rank=2)
    x = torch.randn(5, 3)
    w = layer.weights.weight("b")
    torch.testing.assert_close(layer(x, "b"), x @ w[:3] + w[3])
    with pytest.raises(PolytaskError, match="3 input features"):
        layer(torch.randn(5, 4), "a")
    with pytest.raises(PolytaskError, match="'c'"):
        layer(x, "c")


def test_task_factor_is_the_only_task_specific_parameter():
    layer = DMTRLLinear(3, 2, ["a", "b"], method="tucker", rank=2)
    own = list(layer.weights.task_parameters("a"))
    assert own == [layer.weights.task_factors["a"]]
    shared = {id(p) for p in layer.weights.shared_parameters()}
    assert shared.isdisjoint(id(p) for t in layer.tasks for p in layer.weights.task_parameters(t))
    assert len(shared) + 2 == len(list(layer.parameters()))
    out = layer(torch.randn(4, 3), "b").sum()
    assert torch.autograd.grad(out, own, allow_unused=True) == (None,)


def test_rank_validation():
    with pytest.raises(InvalidHyperparameterError, match="Tucker"):
        TensorFactorisedWeights((2, 3), 2, method="tucker", rank=[3, 3, 2])
    with pytest.raises(InvalidHyperparameterError, match="TT rank 4"):
        TensorFactorisedWeights((2, 3), 2, method="tt", rank=[2, 4])
    with pytest.raises(InvalidHyperparameterError, match="'cp'"):
        TensorFactorisedWeights((2, 3), 2, method="cp")
