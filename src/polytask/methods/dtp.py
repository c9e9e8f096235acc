"""DTP: dynamic task prioritization (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidContextError, InvalidHyperparameterError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("dtp")
class DTP(LossMethod):
    """DTP: weigh each task by a focal term of its smoothed KPI, so hard tasks come first.

    w_k = -(1 - kbar_k)^gamma_k log(kbar_k), where kbar_k is an exponential moving average
    of task k's key performance indicator kappa_k in [0, 1] (accuracy, mIoU, ...; higher is
    better): kbar_k <- alpha kappa_k + (1 - alpha) kbar_k, updated at every ``backward`` from
    the ``kpis=`` passed to it (the first call sets kbar = kappa). Guo, Haque, Huang, Yeung &
    Fei-Fei, "Dynamic Task Prioritization for Multitask Learning", ECCV 2018, task-level
    prioritization (the focal loss FL(kbar; gamma) as a task's mixing weight). A task with a
    low KPI gets a large weight; w_k = 0 once kbar_k = 1.

    Departures: the paper makes gamma_k a task-specific focusing parameter and alpha a
    discount factor in [0, 1]; we could not check the values of its experiments and
    default to gamma = 1 and alpha = 0.9 (recent KPIs weigh most). Pass your own per task.
    A smoothed KPI of exactly 0 has an infinite weight: it raises
    :class:`~polytask.errors.InvalidContextError` instead of producing one.

    Args:
        num_tasks: K.
        gamma: focusing parameter(s) gamma_k >= 0, one float or one per task (default 1).
        alpha: weight of the newest KPI in the moving average, in (0, 1] (default 0.9;
            1 uses the latest KPI alone).
    Needs: the losses and ``kpis`` (Tensor[K] in [0, 1]).
    Returns weights: w (the effective weights of the losses).
    """

    paper: ClassVar[str] = (
        "Guo, Haque, Huang, Yeung & Fei-Fei, Dynamic Task Prioritization for Multitask "
        "Learning, ECCV 2018"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"kpis"})

    def __init__(
        self,
        num_tasks: int,
        *,
        gamma: float | Sequence[float] = 1.0,
        alpha: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
            gammas = torch.full((num_tasks,), float(gamma), dtype=torch.float64)
        else:
            try:
                gammas = torch.as_tensor(list(gamma), dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                gammas = None  # not a sequence of numbers: the error below names it
        if (
            gammas is None
            or gammas.shape != (num_tasks,)
            or not bool((torch.isfinite(gammas) & (gammas >= 0)).all())
        ):
            raise InvalidHyperparameterError(
                f"gamma={gamma!r} must be a finite non-negative float or {num_tasks} of them"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise InvalidHyperparameterError(f"alpha={alpha!r} must lie in (0, 1] (default 0.9)")
        self.gamma = gamma
        self.alpha = float(alpha)
        self.register_buffer("gammas", gammas)
        self.register_buffer("kpi_average", torch.zeros(num_tasks, dtype=torch.float64))
        self.kpi_updates = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "kpi_updates": self.kpi_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.kpi_updates = int(state["kpi_updates"])

    def update_kpis(self, kpis: Tensor) -> Tensor:
        """Fold ``kpis`` [K] into the moving average; return the new kbar."""
        kpis = kpis.to(self.kpi_average)
        if self.kpi_updates == 0:
            new = kpis.clone()
        else:
            new = self.alpha * kpis + (1.0 - self.alpha) * self.kpi_average
        # kpis was range-checked on the host by the context check: this reads CPU values.
        if not bool((new > 0).all()):
            zero = [i for i, v in enumerate(new.tolist()) if not v > 0]
            raise InvalidContextError(
                f"DTP: the smoothed KPI of task(s) {zero} is 0, whose focal weight "
                "-(1 - k)^gamma log(k) is infinite; pass KPIs above 0 (e.g. clamp them to "
                "[1e-3, 1]) or start from a model that scores above 0"
            )
        self.kpi_average.copy_(new)
        self.kpi_updates += 1
        return new

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        kbar = self.update_kpis(ctx["kpis"])
        w = -((1.0 - kbar) ** self.gammas) * torch.log(kbar)
        w = w.to(device=losses.device, dtype=losses.dtype)
        return (w * losses).sum(), w
