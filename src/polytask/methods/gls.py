"""GLS: geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPRW 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidLossesError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register


@register("gls")
class GLS(LossMethod):
    """GLS: minimise the geometric mean of the task losses, (prod_k L_k)^(1/K).

    The gradient of G = (prod_k L_k)^(1/K) is sum_k G / (K L_k) grad L_k, so GLS is the
    linear weighting w_k = G / (K L_k) recomputed at every step: a task with a small loss gets
    a large weight, and rescaling one loss by c > 0 multiplies the update by c^(1/K) without
    changing its direction (each task's term G / (K L_k) grad L_k is scale-free in L_k).
    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019.

    G is computed as exp(mean_k log L_k), which neither overflows nor underflows where the
    product of many losses would; it equals LibMTL's ``losses.prod() ** (1 / K)``. The
    losses must be positive (the geometric mean and its gradient are undefined otherwise);
    a non-positive loss raises :class:`~polytask.errors.InvalidLossesError`.

    Args:
        num_tasks: K.
    Needs: the losses only.
    Returns weights: G / (K L_k), the effective weights (LibMTL 1.1.5 reports
        L_k / (K prod_j L_j) instead, which is not the weight its own update applies).
    """

    paper: ClassVar[str] = (
        "Chennupati, Sistu, Yogamani & Rawashdeh, MultiNet++: Multi-Stream Feature Aggregation "
        "and Geometric Loss Strategy for Multi-Task Learning, CVPR Workshops 2019"
    )

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        if not bool((losses.detach() > 0).all()):
            bad = [(i, v) for i, v in enumerate(losses.detach().tolist()) if not v > 0]
            raise InvalidLossesError(
                "GLS needs positive losses (their geometric mean), got "
                + ", ".join(f"task {i} = {v}" for i, v in bad)
                + "; use losses bounded away from 0 (e.g. add a small constant) or another method"
            )
        geometric_mean = torch.exp(torch.log(losses).mean())
        weights = geometric_mean.detach() / (self.num_tasks * losses.detach())
        return geometric_mean, weights
