"""LSB: loss scale balancing (Lee, Lee & Kim, ICCV 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods._epoch_losses import EpochLossAverages
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("lsb")
class LSB(LossMethod):
    """LSB: once per epoch, give every task the same loss scale w_k L_k, times its difficulty.

    At the start of epoch t the weights become w_k(t) = lambda_k(t) d_k(t) with

    * lambda_k(t) = Lbar(t-1) / (K Lbar_k(t-1)) (loss scale balancing): every task's scale
      lambda_k Lbar_k(t-1) is the same, Lbar(t-1) / K, and their sum is Lbar(t-1);
    * d_k(t) = [(Lbar_k(t-1) / Lbar_k(t-2)) / (Lbar(t-1) / Lbar(t-2))]^beta (difficulty): a
      task whose loss fell more slowly than the overall loss gets d_k > 1;

    where Lbar_k(t) is the average loss of task k over epoch t and Lbar(t) = sum_k w_k(t)
    Lbar_k(t) the average of the overall objective actually minimised in epoch t. Epoch 0
    uses w = 1 (EW), epoch 1 lambda alone (d needs two epochs of record). Lee, Lee & Kim,
    "Learning Multiple Pixelwise Tasks Based on Loss Scale Balancing", ICCV 2021.

    Which formulation, and why: the paper's code repository (github.com/jaehanlee-mcl/LSB-MTL)
    holds only a README and the paper's text was not available to us, so the rule above is
    the one of a public training script that applies LSB to four losses: per-epoch period,
    lambda_k = p_k Lbar / Lbar_k with prior weights p summing to 1 (here p_k = 1/K), and the
    difficulty above with beta = 1. A public LibMTL port ("LSBwD") shares the period and
    lambda, but its difficulty expression mixes weights with losses (we read it as a bug),
    anneals beta linearly from 0 to 1 over training and rescales the d_k to sum to K; we
    keep beta constant (set ``method.beta`` between epochs for a schedule) and do not rescale.
    Epoch 0 uses weights 1 as polytask's EW (both references start from weights summing to
    1); the balancing then keeps whatever overall scale epoch 0 had.

    The loop passes its (0-based) epoch as ``epoch=`` to every ``backward``; the averages
    must be positive. State (running sums, the last two averages, the overall averages and
    the current weights) is in ``state_dict``.

    Args:
        num_tasks: K.
        beta: the difficulty exponent (default 1; 0 disables the difficulty term).
    Needs: the losses and ``epoch``.
    Returns weights: w (constant within an epoch).
    """

    paper: ClassVar[str] = (
        "Lee, Lee & Kim, Learning Multiple Pixelwise Tasks Based on Loss Scale Balancing, ICCV 2021"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"epoch"})

    def __init__(self, num_tasks: int, *, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta != beta:
            raise InvalidHyperparameterError(f"beta={beta!r} must be a finite number (default 1)")
        if abs(beta) == float("inf"):
            raise InvalidHyperparameterError(f"beta={beta!r} must be finite (default 1)")
        self.beta = float(beta)
        self.history = EpochLossAverages(num_tasks)
        self.register_buffer("task_weights", torch.ones(num_tasks, dtype=torch.float64))
        # Average overall objective sum_k w_k Lbar_k of the last two completed epochs.
        self.register_buffer("overall", torch.zeros(2, dtype=torch.float64))

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        if self.task_weights.device != losses.device:
            self.to(losses.device)
        history = self.history
        if history.observe(losses, ctx["epoch"], type(self).__name__):
            latest = history.averages[0]
            # The weights were constant over the epoch that ended: its average objective.
            self.overall[1] = self.overall[0]
            self.overall[0] = (self.task_weights * latest).sum()
            weights = self.overall[0] / (self.num_tasks * latest)
            if history.completed >= 2:
                task_ratio = latest / history.averages[1]
                overall_ratio = self.overall[0] / self.overall[1]
                weights = weights * (task_ratio / overall_ratio) ** self.beta
            self.task_weights.copy_(weights)
        # A copy: the reported weights must not change when the buffer is next updated.
        w = self.task_weights.to(losses.dtype, copy=True)
        return (w * losses).sum(), w
