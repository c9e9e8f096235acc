"""Equal weighting and fixed user weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("ew")
class EqualWeighting(LossMethod):
    """Equal weighting (EW): minimise the sum of the task losses, one backward pass.

    The baseline of every MTL paper (e.g. Vandenhende et al., "Multi-Task Learning for
    Dense Prediction Tasks: A Survey", TPAMI 2021). With ``weights=`` it minimises the
    fixed linear scalarisation sum_k w_k L_k (default w_k = 1, the sum as in LibMTL's EW).

    Args:
        num_tasks: K.
        weights: optional fixed non-negative weights [K]; default all ones.
    Needs: the losses only.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = "Linear scalarisation baseline; Vandenhende et al., TPAMI 2021"

    def __init__(
        self, num_tasks: int, *, weights: Sequence[float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if weights is None:
            w = torch.ones(num_tasks)
        else:
            w = torch.as_tensor(list(weights), dtype=torch.float32)
            if w.shape != (num_tasks,):
                raise InvalidHyperparameterError(
                    f"weights has {w.numel()} entries, expected num_tasks={num_tasks}"
                )
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise InvalidHyperparameterError(
                    f"weights={w.tolist()} must be finite and non-negative"
                )
        self.weights = weights
        self.register_buffer("task_weights", w)

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        w = self.task_weights.to(losses)
        return (w * losses).sum(), w
