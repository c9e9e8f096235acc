"""Tensor trace norms of stacked per-task weights (LAF, Tucker, TT)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.regularizers._tensor import stack_tasks, unfold

__all__ = ["KINDS", "nuclear_norm", "trace_norm", "trace_norm_terms"]

KINDS = ("laf", "tucker", "tt")


def nuclear_norm(matrix: Tensor) -> Tensor:
    """The sum of the singular values; its (sub)gradient is ``U V^T``."""
    return torch.linalg.svdvals(matrix).sum()


def trace_norm_terms(weights: Tensor | Sequence[Tensor], kind: str = "tucker") -> Tensor:
    """The matrix trace norms that the tensor trace norm ``kind`` sums, as a vector.

    For the stacked weights W [D_1, ..., D_N] (tasks on the last axis, N >= 2):

    - ``"laf"`` (last axis flattening): ``[||W_(N)||_*]``, the task-axis unfolding;
    - ``"tucker"``: ``[||W_(i)||_* for i = 1..N]``, every mode-i unfolding;
    - ``"tt"`` (tensor train): ``[||W_[i]||_* for i = 1..N-1]``, where W_[i] reshapes W to
      [D_1 ... D_i, D_{i+1} ... D_N].
    """
    w = stack_tasks(weights)
    n = w.dim()
    if kind == "laf":
        mats = [unfold(w, [n - 1])]
    elif kind == "tucker":
        mats = [unfold(w, [i]) for i in range(n)]
    elif kind == "tt":
        mats = [unfold(w, list(range(i))) for i in range(1, n)]
    else:
        raise InvalidHyperparameterError(f"kind={kind!r}; choose one of {', '.join(KINDS)}")
    return torch.stack([nuclear_norm(m) for m in mats])


def trace_norm(
    weights: Tensor | Sequence[Tensor],
    kind: str = "tucker",
    gammas: Sequence[float] | None = None,
) -> Tensor:
    """Tensor trace norm regulariser of Yang & Hospedales, "Trace Norm Regularised Deep
    Multi-Task Learning", ICLR workshop 2017.

    The per-task weights of one layer (same shape each) are stacked into a tensor W with the
    tasks on the last axis, and ``sum_i gamma_i ||W_i||_*`` over the unfoldings W_i of
    :func:`trace_norm_terms` is returned: a scalar the trainer adds, times its strength
    lambda, to the task losses. Low values mean the tasks' weights share a low-rank structure,
    softly, instead of being tied by hard sharing.

    Args:
        weights: K per-task weight tensors of one shape (e.g. each task's copy of a layer),
            or their stack with tasks on the last axis.
        kind: ``"laf"``, ``"tucker"`` (default) or ``"tt"``.
        gammas: weights of the terms (1 term for LAF, N for Tucker, N - 1 for TT); default
            all 1, as the official code returns the unweighted terms.
    Returns: a scalar tensor, differentiable (subgradient ``U V^T`` of each nuclear norm, as
        the official code's custom gradient).
    """
    terms = trace_norm_terms(weights, kind)
    if gammas is None:
        return terms.sum()
    g = torch.as_tensor(list(gammas), dtype=terms.dtype, device=terms.device)
    if g.shape != terms.shape or not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise InvalidHyperparameterError(
            f"gammas={list(gammas)} must be {terms.numel()} finite non-negative numbers for "
            f"kind={kind!r} on a {stack_tasks(weights).dim()}-axis tensor"
        )
    return (g * terms).sum()
