"""FairGrad: alpha-fair resource allocation among the tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register
from polytask.solvers.nash import alpha_fair_weights


@register("fairgrad")
class FairGrad(GramianMethod):
    """FairGrad: the update that maximises the alpha-fair utility of the tasks' decreases.

    The tasks share a direction d in a ball around 0 with utilities u_k = <d, g_k>, and d
    maximises sum_k u_k^(1-alpha)/(1-alpha) (sum_k log u_k for alpha = 1); its KKT
    conditions give d = sum_k w_k g_k with

        G w = w^(-1/alpha)   (elementwise),   w > 0,   G = J J^T

    (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. 4 and
    Algorithm 1). alpha = 1 is Nash-MTL's condition G w = 1/w; alpha -> 0 tends to linear
    scalarisation and large alpha to max-min fairness. The official code solves the
    equations with ``scipy.optimize.least_squares`` from w = 1/K; we solve them exactly: for
    alpha > 0 they are the stationarity condition of the strictly convex
    1/2 w^T G w - sum_k w_k^(1-1/alpha)/(1-1/alpha) (- sum_k log w_k at alpha = 1), minimised
    by damped Newton (:func:`polytask.solvers.nash.alpha_fair_weights`), which raises
    :class:`~polytask.errors.SolverError` when no solution exists (0 in the convex hull of
    the gradients; ``least_squares`` then returns an arbitrary point). A task whose gradient
    is exactly zero is left out and gets the mean weight of the others.

    Defaults and departures: alpha = 2.0, the value in the authors' released run scripts
    (CelebA and QM9; the paper tunes alpha per benchmark, and the code's own argparse
    default is 1.0, which is Nash-MTL). The official training code also multiplies d by K
    and clips the shared gradient to norm 1 — a training-loop recipe it applies to every
    method, not part of FairGrad's Algorithm 1 — and leaves task-specific parameters
    unweighted; here d = sum_k w_k g_k as in the paper (clip with
    ``torch.nn.utils.clip_grad_norm_`` in your loop to reproduce the recipe) and heads get
    w_k times their gradient, polytask's convention (LibMTL's FairGrad does the same).

    Args:
        num_tasks: K.
        alpha: fairness parameter, > 0 (default 2.0).
    Needs: the Jacobian (Gramian).
    Returns weights: w, with d = w @ J.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    properties: ClassVar[frozenset[str]] = frozenset(
        {"non_conflicting", "permutation_invariant", "aligned_direction"}
    )

    def __init__(self, num_tasks: int, *, alpha: float = 2.0, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise InvalidHyperparameterError(f"alpha={alpha!r} must be a number > 0")
        if not (math.isfinite(alpha) and alpha > 0):
            raise InvalidHyperparameterError(f"alpha={alpha!r} must be finite and > 0")
        self.alpha = float(alpha)
        if self.alpha == 1.0:
            # J -> c J scales w by c^(-2 alpha/(alpha+1)) and d by c^((1-alpha)/(1+alpha)):
            # scale invariant only for alpha = 1.
            self.properties = self.properties | {"scale_invariant"}

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        return alpha_fair_weights(gramian, self.alpha).weights
