"""UW: homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register

#: The factor c of c / sigma^2: 1/2 for a Gaussian likelihood, 1 for a scaled softmax.
_FACTORS = {"regression": 0.5, "classification": 1.0}


@register("uw")
class UncertaintyWeighting(LossMethod):
    """UW: weigh each loss by a learned task uncertainty, 1 / sigma_k^2, plus log sigma_k.

    Minimises sum_k (c_k / sigma_k^2) L_k + log sigma_k over the model and the learnable
    log-variances s_k = log sigma_k^2 (an ``nn.Parameter``, ``log_variance``), i.e.
    sum_k c_k e^{-s_k} L_k + s_k / 2, with c_k = 1/2 for a regression task (Gaussian
    likelihood) and c_k = 1 for a classification task (softmax of logits scaled by
    1 / sigma^2). Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018; like the paper in practice, we learn
    s = log sigma^2 rather than sigma (no division by zero, unconstrained).

    For fixed losses the gradient w.r.t. s_k is 1/2 - c_k e^{-s_k} L_k, so s_k tends to
    log(2 c_k L_k): log L_k for regression, log(2 L_k) for classification, where the
    effective weight c_k e^{-s_k} is 1 / (2 L_k). The losses must be positive for that
    stationary point to exist (a negative loss drives s_k to -infinity).

    The s_k are parameters of the method: build the optimizer over
    ``[*model.parameters(), *method.parameters()]``, or they never move (``backward`` only
    fills their ``.grad``).

    Args:
        num_tasks: K.
        task_types: ``"regression"`` (default, every task) or ``"classification"``, or one of
            them per task. The default is the regression form of LibMTL's UW (the form of
            most public implementations, which apply it to every task).
        init_log_variance: initial s_k (default 0, sigma = 1; the paper does not give one,
            LibMTL starts at -0.5). A float or one value per task.
    Needs: the losses only.
    Returns weights: c_k e^{-s_k} (the effective weights of the losses).
    """

    paper: ClassVar[str] = (
        "Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses for "
        "Scene Geometry and Semantics, CVPR 2018"
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        task_types: str | Sequence[str] = "regression",
        init_log_variance: float | Sequence[float] = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(task_types, str):
            types = [task_types] * num_tasks
        elif isinstance(task_types, Sequence):
            types = list(task_types)
        else:
            raise InvalidHyperparameterError(
                f"task_types={task_types!r} must be 'regression', 'classification' or a "
                f"sequence of {num_tasks} of them"
            )
        if len(types) != num_tasks:
            raise InvalidHyperparameterError(
                f"task_types has {len(types)} entries, expected num_tasks={num_tasks} "
                "(or a single string for every task)"
            )
        unknown = [t for t in types if t not in _FACTORS]
        if unknown:
            raise InvalidHyperparameterError(
                f"task_types={list(types)!r}: {unknown!r} not in {sorted(_FACTORS)}"
            )
        if isinstance(init_log_variance, (int, float)) and not isinstance(init_log_variance, bool):
            init = torch.full((num_tasks,), float(init_log_variance))
        else:
            try:
                init = torch.as_tensor(list(init_log_variance), dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                init = None  # not a sequence of numbers: the error below names it
        if init is None or init.shape != (num_tasks,) or not bool(torch.isfinite(init).all()):
            raise InvalidHyperparameterError(
                f"init_log_variance={init_log_variance!r} must be a finite float or "
                f"{num_tasks} finite floats"
            )
        self.task_types = task_types
        self.init_log_variance = init_log_variance
        self.register_buffer("factors", torch.tensor([_FACTORS[t] for t in types]))
        self.log_variance = nn.Parameter(init.clone())

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        s = self.log_variance.to(losses)
        weights = self.factors.to(losses) * torch.exp(-s)
        total = (weights * losses).sum() + 0.5 * s.sum()
        return total, weights.detach()
