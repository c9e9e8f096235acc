"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021): IMTL-G, IMTL-L and IMTL."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from polytask.errors import SolverError
from polytask.methods.base import AggregationResult, GramianMethod, LossMethod
from polytask.methods.registry import register

_PAPER = (
    "Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, Towards Impartial Multi-task Learning, "
    "ICLR 2021"
)


def imtl_g_weights(gramian: Tensor) -> Tensor:
    """IMTL-G's weights alpha [K] (sum 1) with <alpha @ J, u_k> equal for every task k.

    The paper's closed form alpha_{2:K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:K}
    (D rows g_1 - g_k, U rows u_1 - u_k, u_k = g_k / ||g_k||) is, after eliminating alpha_1
    and the common projection p, the same linear system as
    sum_i alpha_i <g_i, u_k> = p for all k, sum_i alpha_i = 1,
    which is what we solve here in float64, from the Gramian (<g_i, u_k> = G_ik / ||g_k||),
    normalised by max_k G_kk. Where D U^T is singular but the system is consistent (e.g.
    identical gradients, or more tasks than the gradients' rank + 1) we take its minimum-norm
    least-squares solution, which is symmetric in the tasks (identical gradients get equal
    weights); where it is inconsistent (no direction in the affine hull of the gradients has
    equal projections) we raise :class:`SolverError`. Tasks with a zero gradient have no
    u_k: they are left out of the system and get weight 0 (all zero: weights 1/K, d = 0).
    """
    g = gramian.detach().to("cpu", torch.float64).numpy()
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    diag = np.clip(np.diag(g), 0.0, None)
    scale = float(diag.max()) if k else 0.0
    if scale <= 0.0:
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
    g = g / scale
    norms = np.sqrt(diag / scale)
    idx = np.flatnonzero(norms > 0.0)
    m = idx.size
    alpha = np.zeros(k)
    if m == 1:
        alpha[idx] = 1.0
    else:
        proj = g[np.ix_(idx, idx)] / norms[idx][None, :]  # proj[i, j] = <g_i, u_j>
        system = np.zeros((m + 1, m + 1))
        system[:m, :m] = proj.T
        system[:m, m] = -1.0
        system[m, :m] = 1.0
        rhs = np.zeros(m + 1)
        rhs[m] = 1.0
        sol = np.linalg.lstsq(system, rhs, rcond=1e-12)[0]
        residual = float(np.linalg.norm(system @ sol - rhs))
        bound = 1e-8 * max(1.0, float(np.linalg.norm(system, 2) * np.linalg.norm(sol)))
        if not np.all(np.isfinite(sol)) or residual > bound:
            raise SolverError(
                "IMTL-G: D U^T is singular and no combination of the task gradients (with "
                "weights summing to 1) has equal projections on every task's unit gradient "
                f"(least-squares residual {residual:.3e}); the gradients are degenerate, e.g. "
                "collinear points off the origin",
                residual=residual,
            )
        alpha[idx] = sol[:m]
    return torch.as_tensor(alpha, dtype=gramian.dtype, device=gramian.device)


@register("imtl_g")
class IMTLG(GramianMethod):
    """IMTL-G: the combination of task gradients with equal projections on every task.

    d = sum_k alpha_k g_k with sum_k alpha_k = 1 and <d, u_k> equal for all k
    (u_k = g_k / ||g_k||), in closed form alpha_{2:K} = g_1 U^T (D U^T)^{-1},
    alpha_1 = 1 - sum_k alpha_{2:K}, D = [g_1 - g_2, ..., g_1 - g_K],
    U = [u_1 - u_2, ..., u_1 - u_K] (:func:`imtl_g_weights`). Liu, Li, Kuang, Xue, Chen,
    Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021, gradient balance.

    The weights can be negative for K >= 3. As in the paper, task-specific parameters get
    their own task's unweighted gradient (``BackwardResult.head_weights`` is all ones), so a
    negative alpha_k never pushes a head uphill.

    Args:
        num_tasks: K.
    Needs: the Jacobian (Gramian).
    Returns weights: alpha, so d = weights @ J. Zero-gradient tasks get 0; a singular and
        inconsistent system raises :class:`~polytask.errors.SolverError`.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = _PAPER
    properties: ClassVar[frozenset[str]] = frozenset(
        {"permutation_invariant", "positively_homogeneous", "aligned_identity"}
    )

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        return imtl_g_weights(gramian)

    def _head_weights(self, weights: Tensor) -> Tensor:
        return torch.ones_like(weights)


@register("imtl_l")
class IMTLL(LossMethod):
    """IMTL-L: learn loss scales that make every scaled loss equal to 1.

    Minimises sum_k (e^{s_k} L_k - s_k) over the model and the learnable s_k (init 0); the
    gradient w.r.t. s_k is e^{s_k} L_k - 1, so at the stationary point s_k = -log L_k and
    every scaled loss e^{s_k} L_k equals 1. Liu et al., "Towards Impartial Multi-task
    Learning", ICLR 2021, loss balance. The losses must be positive for that stationary point
    to exist.

    The s_k are an ``nn.Parameter`` of the method (``loss_scale``): build the optimizer over
    ``[*model.parameters(), *method.parameters()]``, or they never move.

    Args:
        num_tasks: K.
    Needs: the losses only.
    Returns weights: e^{s_k} (the effective weights of the losses).
    """

    paper: ClassVar[str] = _PAPER

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        self.loss_scale = nn.Parameter(torch.zeros(num_tasks))

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        s = self.loss_scale.to(losses)
        total = (s.exp() * losses - s).sum()
        return total, s.detach().exp()


@register("imtl")
class IMTL(GramianMethod):
    """IMTL: IMTL-L's learnable loss scales with IMTL-G on the scaled losses' gradients.

    The losses are scaled by e^{s_k} (learnable s_k, init 0), the shared parameters get
    IMTL-G of the scaled gradients e^{s_k} g_k, i.e. d = sum_k alpha_k e^{s_k} g_k with alpha
    from :func:`imtl_g_weights` on the Gramian diag(e^s) G diag(e^s), and s_k gets the
    gradient of IMTL-L's objective sum_k (e^{s_k} L_k - s_k), e^{s_k} L_k - 1, accumulated
    into ``loss_scale.grad`` by :meth:`backward` without a second backward pass. Liu et al.,
    "Towards Impartial Multi-task Learning", ICLR 2021 (the full method, as in LibMTL's IMTL).

    The optimizer must include ``method.parameters()`` (the s_k). As in the paper,
    task-specific parameters get e^{s_k} times their task's gradient (the gradient of the
    scaled loss; ``BackwardResult.head_weights``).

    Args:
        num_tasks: K.
    Needs: the Jacobian (Gramian) and the losses.
    Returns weights: alpha_k e^{s_k}, so d = weights @ J.
    """

    paper: ClassVar[str] = _PAPER
    properties: ClassVar[frozenset[str]] = frozenset(
        {"positively_homogeneous", "aligned_direction"}
    )

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        self.loss_scale = nn.Parameter(torch.zeros(num_tasks))

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        scale = self.loss_scale.detach().to("cpu", torch.float64).exp()
        scaled = gramian.detach().to("cpu", torch.float64) * scale[:, None] * scale[None, :]
        alpha = imtl_g_weights(scaled)
        return (alpha * scale).to(dtype=gramian.dtype, device=gramian.device)

    def _head_weights(self, weights: Tensor) -> Tensor:
        return self.loss_scale.detach().exp().to(weights)

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        result = super()._aggregate(jacobian, losses=losses, **ctx)
        # Only a usable update moves the scales (backward raises on a non-finite one).
        if losses is not None and bool(torch.isfinite(result.direction).all()):
            s = self.loss_scale
            grad = (s.detach().exp() * losses.detach().to(s.device, s.dtype) - 1.0).to(s.dtype)
            if s.grad is None:
                s.grad = grad.clone()
            else:
                s.grad.add_(grad)
        return result
