"""Generalized tensor trace norm (Zhang, Zhang & Wang, 2020) on hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import InvalidHyperparameterError
from polytask.regularizers import (
    flattenings,
    generalized_trace_norm,
    nuclear_norm,
    trace_norm_terms,
)


def test_flattenings_cover_each_row_column_split_once():
    assert flattenings(2) == [(0,)]
    assert flattenings(3) == [(0,), (1,), (0, 1)]
    assert len(flattenings(5)) == 2**4 - 1


def test_rank_one_tensor_has_the_same_norm_in_every_flattening():
    w = torch.einsum("i,j,k,l->ijkl", *(torch.tensor([3.0, 4.0]),) * 4)  # |.| = 5 each
    assert generalized_trace_norm(w).item() == pytest.approx(625.0)


def test_one_hot_coefficients_recover_the_classical_norms():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 2)
    sets = flattenings(3)
    one_hot = torch.eye(len(sets))
    laf = generalized_trace_norm(w, one_hot[sets.index((0, 1))])
    torch.testing.assert_close(laf, trace_norm_terms(w, "laf")[0])
    mode1 = generalized_trace_norm(w, one_hot[sets.index((1,))])
    torch.testing.assert_close(mode1, nuclear_norm(w.permute(1, 0, 2).reshape(4, 6)))
    mixed = torch.tensor([0.5, 0.25, 0.25])
    expected = sum(a * generalized_trace_norm(w, one_hot[i]) for i, a in enumerate(mixed))
    torch.testing.assert_close(generalized_trace_norm(w, mixed), expected)


def test_coefficients_must_be_on_the_simplex():
    w = torch.randn(2, 2, 2)
    with pytest.raises(InvalidHyperparameterError, match="summing"):
        generalized_trace_norm(w, [0.5, 0.5, 0.5])
    with pytest.raises(InvalidHyperparameterError, match="summing"):
        generalized_trace_norm(w, [1.0, 0.0])
