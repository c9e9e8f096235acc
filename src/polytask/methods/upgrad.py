"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232, 2024;
the authors' implementation is torchjd (``torchjd.aggregation.UPGrad`` / ``DualProj``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods._preference import is_uniform, preference_vector
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register
from polytask.solvers.nonneg_qp import dual_cone_weights

_PAPER = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232, 2024"


def _check_eps(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidHyperparameterError(f"{name}={value!r} must be a number >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise InvalidHyperparameterError(f"{name}={value!r} must be finite and >= 0")
    return float(value)


class _DualConeMethod(GramianMethod):
    """Shared hyper-parameters and Gramian conditioning of UPGrad and DualProj."""

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = _PAPER

    def __init__(
        self,
        num_tasks: int,
        *,
        pref_vector: Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        self.norm_eps = _check_eps("norm_eps", norm_eps)
        self.reg_eps = _check_eps("reg_eps", reg_eps)
        pref = preference_vector(pref_vector, num_tasks, default=1.0 / num_tasks, nonnegative=True)
        # Weights that do not sum to 1 scale an aligned gradient by their sum.
        if abs(float(pref.sum()) - 1.0) > 1e-12:
            self.properties = (self.properties - {"aligned_identity"}) | {"aligned_direction"}
        if not is_uniform(pref):
            self.properties = self.properties - {"permutation_invariant"}
        self.pref_vector = pref_vector
        self.register_buffer("pref", pref, persistent=False)

    def _conditioned(self, gramian: Tensor) -> Tensor:
        """G / trace(G) + max(reg_eps, K eps) I, as torchjd (G -> 0 if trace < norm_eps).

        K eps (eps of the Gramian's dtype) is the round-off level of a trace-normalised
        Gramian: the floor keeps the QP convex when round-off makes G slightly indefinite.
        """
        g = gramian.detach().to("cpu", torch.float64)
        k = g.shape[0]
        trace = float(g.diagonal().sum())
        if trace > 0 and trace >= self.norm_eps:
            g = g / trace
        else:
            g = torch.zeros_like(g)
        ridge = max(self.reg_eps, k * float(torch.finfo(gramian.dtype).eps))
        return g + ridge * torch.eye(k, dtype=torch.float64)


@register("upgrad")
class UPGrad(_DualConeMethod):
    """UPGrad: project every task gradient onto the dual cone of all of them, and average.

    d = sum_k p_k pi_J(g_k), where pi_J is the projection onto the dual cone
    {x : <x, g_j> >= 0 for all j} and p is the preference vector (uniform 1/K by default), so
    d conflicts with no task and, with no conflict at all, is the mean gradient (Quinton &
    Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; pi_J is their Eq. 3). By
    their Proposition 1, pi_J(J^T u) = J^T w with w = argmin_{w >= u} w^T G w, so d = w @ J
    with w = sum_k w^(k), w^(k) = argmin_{w >= p_k e_k} w^T G w; each is a non-negative QP
    in K variables solved exactly by an active-set method
    (:func:`polytask.solvers.nonneg_qp.dual_cone_weights`).

    The QP is solved on G / trace(G) + reg_eps I (the normalisation leaves the weights
    unchanged). The authors' torchjd 0.18.0 (``QuadprogProjector``) uses reg_eps = 1e-4, so
    that quadprog always gets a positive definite matrix, at the price of a conflict of up to
    reg_eps trace(G) w_k with task k (<d, g_k> >= -reg_eps trace(G) w_k, about 1e-4 relative);
    our active-set solver handles singular Gramians, so we default to reg_eps = 0, the exact
    projection of the paper, up to a ridge of at least K eps (eps of the Gramian's dtype:
    1e-14 in float64) that keeps the QP convex when round-off makes G slightly indefinite. torchjd
    also replaces G by 0 when trace(G) < norm_eps = 1e-4, an absolute threshold under which
    its UPGrad returns the plain mean of the gradients (conflicts included); we default to
    norm_eps = 0, so that small gradients are projected like large ones.
    ``reg_eps=1e-4, norm_eps=1e-4`` reproduces torchjd 0.18.0 (to 1e-12 in our tests).

    Args:
        num_tasks: K.
        pref_vector: weights p [K] of the projected gradients (default 1/K each).
        norm_eps: if trace(G) < norm_eps, project with G = 0 (default 0; torchjd: 1e-4).
        reg_eps: ridge added to the trace-normalised Gramian (default 0; torchjd: 1e-4).
    Needs: the Jacobian (Gramian).
    Returns weights: w, with d = w @ J.
    """

    properties: ClassVar[frozenset[str]] = frozenset(
        {"non_conflicting", "permutation_invariant", "positively_homogeneous", "aligned_identity"}
    )

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        g = self._conditioned(gramian)
        w = dual_cone_weights(g, torch.diag(self.pref.to("cpu"))).sum(dim=0)
        return w.to(dtype=gramian.dtype, device=gramian.device)


@register("dualproj")
class DualProj(_DualConeMethod):
    """DualProj: project the mean gradient onto the dual cone of the task gradients.

    d = pi_J(sum_k p_k g_k), the projection of the (preference-weighted, uniform 1/K by
    default) mean gradient onto {x : <x, g_j> >= 0 for all j}: the update of Gradient
    Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11) used as an aggregator by
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024. By their
    Proposition 1, d = w @ J with w = argmin_{w >= p} w^T G w, a non-negative QP in K
    variables solved exactly (:func:`polytask.solvers.nonneg_qp.dual_cone_weights`).
    ``reg_eps`` and ``norm_eps`` are as in :class:`UPGrad`: 0 by default (the exact
    projection), 1e-4 both in torchjd 0.18.0.

    Args:
        num_tasks: K.
        pref_vector: weights p [K] of the gradients before projection (default 1/K each).
        norm_eps: if trace(G) < norm_eps, project with G = 0 (default 0; torchjd: 1e-4).
        reg_eps: ridge added to the trace-normalised Gramian (default 0; torchjd: 1e-4).
    Needs: the Jacobian (Gramian).
    Returns weights: w, with d = w @ J.
    """

    properties: ClassVar[frozenset[str]] = frozenset(
        {"non_conflicting", "permutation_invariant", "positively_homogeneous", "aligned_identity"}
    )

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        g = self._conditioned(gramian)
        w = dual_cone_weights(g, self.pref.to("cpu"))
        return w.to(dtype=gramian.dtype, device=gramian.device)
