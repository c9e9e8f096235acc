"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods._epoch_losses import EpochLossAverages
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("dwa")
class DWA(LossMethod):
    """DWA: weight each task by the softmax of its loss's rate of change over the last epochs.

    w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T), r_k(t-1) = L_k(t-1) / L_k(t-2),
    where L_k(t) is the average training loss of task k over epoch t, so tasks whose loss
    decreases slowly get larger weights; the weights sum to K and are fixed within an epoch;
    w = 1 in the first two epochs (no ratio yet). Liu, Johns & Davison, "End-to-End
    Multi-Task Learning with Attention", CVPR 2019; as in the official MTAN code and LibMTL,
    L_k(t) is the mean of the per-step training losses of epoch t.

    The loop passes its (0-based) epoch counter as ``epoch=`` to every ``backward``; the
    method averages the losses it sees within an epoch and updates the weights at the first
    step of the next. The history (the running sum and the last two averages) is state in
    ``state_dict``. The averages must be positive (they are divided by one another). Epochs
    without any ``backward`` call leave no average: r then compares the two most recent
    epochs that had steps.

    Args:
        num_tasks: K.
        temperature: T, the softmax temperature (paper: 2). Larger T gives more uniform
            weights.
    Needs: the losses and ``epoch``.
    Returns weights: w (constant within an epoch).
    """

    paper: ClassVar[str] = (
        "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"epoch"})

    def __init__(self, num_tasks: int, *, temperature: float = 2.0, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise InvalidHyperparameterError(
                f"temperature={temperature!r} must be a positive number (paper: 2.0)"
            )
        if not temperature > 0 or temperature == float("inf"):
            raise InvalidHyperparameterError(
                f"temperature={temperature!r} must be positive and finite (paper: 2.0)"
            )
        self.temperature = float(temperature)
        self.history = EpochLossAverages(num_tasks)
        self.register_buffer("task_weights", torch.ones(num_tasks, dtype=torch.float64))

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        if self.task_weights.device != losses.device:
            self.to(losses.device)
        if self.history.observe(losses, ctx["epoch"], type(self).__name__):
            if self.history.completed >= 2:
                ratio = self.history.averages[0] / self.history.averages[1]
                self.task_weights.copy_(
                    self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
                )
        # A copy: the reported weights must not change when the buffer is next updated.
        w = self.task_weights.to(losses.dtype, copy=True)
        return (w * losses).sum(), w
