"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register
from polytask.solvers.cagrad import cagrad_inner

_RESCALES = (0, 1, 2)


@register("cagrad")
class CAGrad(GramianMethod):
    """CAGrad: the update in a ball around the mean gradient that best helps the worst task.

    With g0 = (1/K) sum_k g_k, CAGrad solves
    max_d min_k <g_k, d> subject to ||d - g0|| <= c ||g0||, through its dual:
    w = argmin_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||  (g_w = sum_k w_k g_k), then
    d = g0 + (c ||g0|| / ||g_w||) g_w, divided by 1 + c^2 (``rescale=1``), 1 + c
    (``rescale=2``) or 1 (``rescale=0``). Liu, Liu, Jin, Stone & Liu,
    "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

    The inner problem is solved exactly in float64 from the Gramian
    (:func:`polytask.solvers.cagrad.cagrad_inner`), where the official code (repo
    Cranial-XIX/CAGrad) calls SciPy's SLSQP with default tolerances. When the optimum has
    g_w = 0 (the origin is in the hull of the gradients and optimal, possible for c >= 1)
    the direction is g0, the limit of the official formula with its 1e-8 guard.

    Scale convention: d is built on the *mean* gradient, so c = 0 gives exactly the mean
    gradient. The official training scripts multiply the result by K ("to match the sum
    loss"); polytask does not, so compare learning rates with that factor in mind.

    Args:
        num_tasks: K.
        c: radius factor c >= 0 (paper default 0.4, its setting for NYUv2 and Cityscapes;
            LibMTL's ``calpha`` default is 0.5). The paper's convergence result needs c < 1.
        rescale: 1 (default, as in the official NYUv2/Cityscapes/MTRL scripts), 0 or 2.
    Needs: the Jacobian (Gramian).
    Returns weights: (1/K + (c ||g0|| / ||g_w||) w_k) / rescale factor, so d = weights @ J.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Liu, Liu, Jin, Stone & Liu, Conflict-Averse Gradient Descent for Multi-task Learning, "
        "NeurIPS 2021"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        {"permutation_invariant", "positively_homogeneous", "aligned_direction"}
    )

    def __init__(self, num_tasks: int, *, c: float = 0.4, rescale: int = 1, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise InvalidHyperparameterError(f"c={c!r} must be a finite number >= 0")
        if isinstance(rescale, bool) or rescale not in _RESCALES:
            raise InvalidHyperparameterError(
                f"rescale={rescale!r} must be one of {_RESCALES} (0: none, 1: divide by 1 + c^2, "
                "2: divide by 1 + c)"
            )
        self.c = float(c)
        self.rescale = rescale

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        k = gramian.shape[0]
        sol = cagrad_inner(gramian, self.c)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        if sol.gw_norm > 0.0 and sol.radius > 0.0:
            w = w + (sol.radius / sol.gw_norm) * torch.from_numpy(sol.w)
        if self.rescale == 1:
            w = w / (1.0 + self.c**2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return w.to(dtype=gramian.dtype, device=gramian.device)
