"""AW: adaptive weighting by the validation-loss trend (He et al., ACM MM 2017)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidContextError, InvalidHyperparameterError, NonFiniteError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("aw")
class AdaptiveWeighting(LossMethod):
    """AW: weight each task by how fast, and how high, its validation loss still moves.

    He, Wang, Fu, Feng, Jiang & Xue, "Adaptively Weighted Multi-task Deep Network for Person
    Attribute Classification", ACM Multimedia 2017 (the "validation loss trend algorithm"), as
    in the authors' code (github.com/qiexing/adaptive_weighted_attribute,
    ``python_loss_layer.py``, ``TrainValWeightedEuclideanLossLayer``). The validation losses
    V [K] passed at every step are averaged over windows of ``interval`` steps; at the end of
    each window after the first, with m the window's mean and m' the previous window's,

        trend_k = |m_k - m'_k| / m_k,     a_k = trend_k / mean(trend) * m_k / mean(m),

    and the objective is sum_k w_k L_k with w = a / mean(a) (mean 1, sum K). Tasks whose
    validation loss still changes fast relative to its level, and tasks with a high
    validation loss, get more weight. The weights are 1 until the end of the second window.

    The authors' network evaluates a validation half-batch at every iteration; here the
    training loop passes the latest validation losses at every step (``val_losses=``), e.g.
    those of a validation mini-batch, or the last full evaluation repeated until the next.
    With an evaluation every N steps (``polytask.train.Trainer`` evaluates once per epoch
    and passes that result), set ``interval=N``: each window then holds one evaluation and the
    trend is the relative change between consecutive evaluations. A shorter window can fall
    between two evaluations; if no task's validation mean moved over a window, the trends are
    all 0 and the weights undefined (NaN in the authors' code), and
    :class:`~polytask.errors.NonFiniteError` says so.

    Args:
        num_tasks: K.
        interval: window length in steps, >= 1; default 200 (the authors' code).
    Needs: ``val_losses`` [K], positive, at every ``backward`` call.
    Returns weights: w (mean 1).
    """

    paper: ClassVar[str] = (
        "He, Wang, Fu, Feng, Jiang & Xue, Adaptively Weighted Multi-task Deep Network for "
        "Person Attribute Classification, ACM Multimedia 2017"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"val_losses"})

    def __init__(self, num_tasks: int, *, interval: int = 200, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InvalidHyperparameterError(f"interval={interval!r} must be an integer >= 1")
        self.interval = interval
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("prev_mean", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("task_weights", torch.ones(num_tasks, dtype=torch.float64))

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        val = ctx["val_losses"].to("cpu", torch.float64)
        if not bool((val > 0).all()):
            raise InvalidContextError(
                f"AW divides by the validation losses and needs them positive, got "
                f"val_losses={val.tolist()}"
            )
        self.step += 1
        self.window_sum += val.to(self.window_sum)
        step = int(self.step)
        if step % self.interval == 0:
            mean = self.window_sum / self.interval
            self.window_sum.zero_()
            if step >= 2 * self.interval:
                self._update(mean)
            self.prev_mean.copy_(mean)
        # A copy: the reported weights must not change with the buffer at later steps.
        w = self.task_weights.to(losses, copy=True)
        return (w * losses).sum(), w

    def _update(self, mean: Tensor) -> None:
        trend = (mean - self.prev_mean).abs() / mean
        if not float(trend.sum()) > 0:
            raise NonFiniteError(
                f"AW: no task's mean validation loss changed over the last {self.interval} "
                f"steps (mean {mean.tolist()}), so the trends are all 0 and the weights "
                "undefined; pass fresh validation losses at every step, or set interval= to "
                "the number of steps between two evaluations (e.g. the steps per epoch)"
            )
        a = trend / trend.mean() * (mean / mean.mean())
        self.task_weights.copy_(a / a.mean())
