"""spMTL: self-paced, easy-to-hard task weights (Murugesan & Carbonell, IJCAI 2017)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods._epoch_losses import EpochLossAverages
from polytask.methods.base import LossMethod
from polytask.methods.registry import register

__all__ = ["TaskCurriculum", "self_paced_task_weights"]


def self_paced_task_weights(losses: Tensor, pace: float | Tensor) -> Tensor:
    """The closed-form task weights tau_t = exp(-l_t / lambda) / sum_s exp(-l_s / lambda).

    This is the minimiser over the probability simplex of sum_t tau_t l_t + lambda r(tau) with
    r(tau) = sum_t tau_t log tau_t, the update of the official code (``selftype='prob'``).
    It is computed as a softmax, which subtracts the largest exponent first, so that large
    losses or a small pace cannot underflow every weight to 0.

    Args:
        losses: [K] the tasks' losses l_t.
        pace: lambda > 0 (a float or a 0-d tensor).
    """
    return torch.softmax(-losses / pace, dim=0)


def _number(name: str, value: Any, *, low: float, strict: bool, default: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise InvalidHyperparameterError(
            f"{name}={value!r} must be a finite number {bound} (default {default})"
        )
    return float(value)


@register("task_curriculum")
class TaskCurriculum(LossMethod):
    """spMTL: weight tasks easy-to-hard by a softmax of -loss / pace, with a growing pace.

    Murugesan & Carbonell, "Self-Paced Multitask Learning with Shared Knowledge", IJCAI 2017
    (arXiv 1703.00977). The tasks' losses are weighted by tau on the probability simplex,

        min_{W, Theta, tau} sum_t tau_t [L_t(w_t) + P(w_t, Theta)] + lambda r(tau),

    and tau is updated in closed form from the tasks' current losses l_t, then the pace
    lambda grows by a factor c, so that training starts on the easy (low-loss) tasks and
    moves to uniform weights over all tasks:

        tau_t = exp(-l_t / lambda) / sum_s exp(-l_s / lambda),   lambda <- c lambda.

    The update and c are those of the authors' official code (github.com/keerthi166/FMTL,
    ``model/SPMTFLearner.m`` and the other ``SP*Learner.m``, ``selftype='prob'``, c = 1.1);
    it is exactly the minimiser over the simplex of sum_t tau_t l_t + lambda r(tau) with the
    negative-entropy regulariser r(tau) = sum_t tau_t log tau_t (see
    :func:`self_paced_task_weights`). The paper's text was not available to us: the objective
    above is the paper's as restated in public reading notes, and r(tau) is identified from
    the official update, which is its closed-form minimiser (a convex r is determined by
    that map up to a constant).

    One alternation of the paper (solve the task parameters, then tau, then grow lambda) is
    one epoch here: the loop passes its (0-based) epoch counter as ``epoch=`` to every
    ``backward``; the method averages the step losses of an epoch and, at the first step of
    the next, sets tau from that average (the first update uses the initial lambda) and
    multiplies lambda by c. Until the first update, tau = 1/K (the official code's first
    solve does not use tau). Epochs without a ``backward`` leave no average and no update.
    The losses may have any sign.

    tau weighs the tasks in the shared parameters only: they get the gradient of
    sum_t tau_t L_t (lambda r(tau) does not depend on the network), while each task's own
    parameters (every parameter ``losses`` reaches outside ``shared_params``) get its
    unweighted gradient (``BackwardResult.head_weights`` is all ones). The objective is
    separable in the task parameters w_t and tau_t > 0 scales task t's whole term, so its
    minimiser in w_t does not depend on tau; the official code accordingly solves every
    task's parameters with unweighted losses and uses tau only in the shared-knowledge step.
    Scaling a head's gradient by tau_t would instead all but freeze the heads of the hard
    tasks, whose tau_t can be vanishingly small early in the curriculum.

    Departures: the paper and the official code use each task's loss on the whole training
    set at the solved parameters (plus its term of the shared regulariser); a deep network
    has neither, so l_t is the average of the epoch's step losses, as DWA does. The official
    code cross-validates the initial lambda per data set (grids from 1e-3 to 1e3) and has no
    default: ``pace=1`` here is a neutral choice; lambda is in the units of the losses, so
    tune it to their scale (a pace far below the gaps between losses puts all weight on the
    easiest task, one far above gives near-uniform weights). tau sums to 1, so at uniform
    weights the step is 1/K of equal weighting's.

    Args:
        num_tasks: K.
        pace: the initial lambda > 0 (default 1; the paper tunes it).
        growth: c >= 1, the factor lambda grows by at each update (official code: 1.1).
    Needs: the losses and ``epoch``.
    Returns weights: tau (constant within an epoch, sums to 1), the weights of the shared
        parameters' update; head_weights: ones.
    """

    paper: ClassVar[str] = (
        "Murugesan & Carbonell, Self-Paced Multitask Learning with Shared Knowledge, IJCAI 2017"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"epoch"})
    unweighted_heads: ClassVar[bool] = True

    def __init__(
        self, num_tasks: int, *, pace: float = 1.0, growth: float = 1.1, **kwargs: Any
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        self.pace = _number("pace", pace, low=0.0, strict=True, default="1.0")
        self.growth = _number("growth", growth, low=1.0, strict=False, default="1.1")
        self.register_buffer(
            "task_weights", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )
        self.register_buffer("current_pace", torch.tensor(self.pace, dtype=torch.float64))
        # The losses may have any sign here: tau is a softmax, nothing divides by them.
        self.history = EpochLossAverages(num_tasks, positive=False)
        self.updates = 0

    @property
    def epoch(self) -> int:
        """The epoch of the latest step (-1 before the first)."""
        return self.history.epoch

    @property
    def steps(self) -> int:
        """Steps taken so far in that epoch."""
        return self.history.steps

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "updates": self.updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.updates = int(state["updates"])

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        if self.task_weights.device != losses.device:
            self.to(losses.device)
        if self.history.observe(losses, ctx["epoch"], type(self).__name__):
            average = self.history.averages[0]
            self.task_weights.copy_(self_paced_task_weights(average, self.current_pace))
            self.current_pace.mul_(self.growth)
            self.updates += 1
        # A copy: the reported weights must not change when the buffer is next updated.
        w = self.task_weights.to(losses.dtype, copy=True)
        return (w * losses).sum(), w
