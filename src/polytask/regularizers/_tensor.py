"""Tensor helpers of the regularisers: stacking per-task weights, unfoldings, mode products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError

__all__ = ["mode_product", "stack_tasks", "unfold"]


def stack_tasks(weights: Tensor | Sequence[Tensor]) -> Tensor:
    """Per-task weights as one tensor whose last axis indexes the tasks.

    A tensor is taken as already stacked (tasks last); a sequence of K same-shaped per-task
    tensors is stacked along a new last axis.
    """
    if isinstance(weights, Tensor):
        w = weights
    else:
        weights = list(weights)
        if not weights:
            raise PolytaskError("weights is empty; pass one weight tensor per task")
        shapes = {tuple(x.shape) for x in weights}
        if len(shapes) != 1:
            raise PolytaskError(
                f"per-task weights must all have one shape to be stacked, got {sorted(shapes)}"
            )
        w = torch.stack(weights, dim=-1)
    if w.dim() < 2:
        raise PolytaskError(
            f"stacked weights must have a task axis and at least one other, got {tuple(w.shape)}"
        )
    if not w.is_floating_point():
        raise PolytaskError(f"weights must be floating point, got {w.dtype}")
    return w


def unfold(w: Tensor, modes: Sequence[int]) -> Tensor:
    """The matrix with the axes ``modes`` as rows and the others, in order, as columns."""
    modes = list(modes)
    rest = [i for i in range(w.dim()) if i not in modes]
    rows = 1
    for i in modes:
        rows *= w.shape[i]
    return w.permute(*modes, *rest).reshape(rows, -1)


def mode_product(w: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``w x_mode matrix``: multiply axis ``mode`` of ``w`` by ``matrix`` [new, w.shape[mode]]."""
    return torch.movedim(torch.tensordot(matrix, w, dims=([1], [mode])), 0, mode)
