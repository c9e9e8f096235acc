"""Generalized tensor trace norm: a convex combination of the trace norms of all flattenings."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.regularizers._tensor import stack_tasks, unfold
from polytask.regularizers.trace_norm import nuclear_norm

__all__ = ["flattenings", "generalized_trace_norm"]


def flattenings(order: int) -> list[tuple[int, ...]]:
    """The row-mode sets S of the distinct flattenings W_(S) of an ``order``-axis tensor.

    W_(S) and W_(complement of S) are transposes with the same trace norm, so one set of each
    pair is listed (the one without the last axis): 2^(N-1) - 1 sets, ordered by size then
    lexicographically.
    """
    if order < 2:
        raise InvalidHyperparameterError(f"a tensor with {order} axes has no flattening")
    modes = range(order - 1)
    return [s for r in range(1, order) for s in itertools.combinations(modes, r)]


def generalized_trace_norm(
    weights: Tensor | Sequence[Tensor], coefficients: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Generalized tensor trace norm (GTTN): ``sum_S alpha_S ||W_(S)||_*``.

    Yi Zhang, Yu Zhang & Wei Wang, "Deep Multi-Task Learning via Generalized Tensor Trace
    Norm", arXiv:2002.04799, 2020. W stacks the per-task weights of one layer (tasks on the
    last axis); S runs over every flattening of W (:func:`flattenings`), so that every
    low-rank structure the Tucker, TT and LAF trace norms can see, and the mixed ones they
    cannot, is covered; alpha lies on the simplex.

    Args:
        weights: K per-task weight tensors of one shape, or their stack (tasks last).
        coefficients: alpha, one per flattening in the order of :func:`flattenings`,
            non-negative and summing to 1; default uniform. A tensor (e.g. the softmax of
            learnable logits) keeps its graph.

    Departure: the paper also learns alpha with several strategies inside its objective;
    here alpha is an input, so fixed, tuned or learned coefficients can all be passed.
    """
    w = stack_tasks(weights)
    sets = flattenings(w.dim())
    norms = torch.stack([nuclear_norm(unfold(w, s)) for s in sets])
    if coefficients is None:
        return norms.mean()
    alpha = torch.as_tensor(coefficients, dtype=norms.dtype, device=norms.device)
    if (
        alpha.shape != norms.shape
        or bool((alpha < 0).any())
        or abs(float(alpha.sum()) - 1.0) > 1e-6
    ):
        raise InvalidHyperparameterError(
            f"coefficients={alpha.tolist()} must be {len(sets)} non-negative numbers summing "
            f"to 1 (one per flattening {sets})"
        )
    return (alpha * norms).sum()
