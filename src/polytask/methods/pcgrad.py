"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.autograd import gramian
from polytask.methods.base import AggregationResult, GradientMethod
from polytask.methods.registry import register

__all__ = ["PCGrad", "partner_orders"]


def partner_orders(generator: torch.Generator, num_tasks: int, blocks: int = 1) -> Tensor:
    """For each block and task i, a uniformly random order of the other tasks.

    Returns a long tensor [blocks, K, K-1] drawn from ``generator`` only: ``out[b, i]`` is a
    random permutation of ``{0..K-1} \\ {i}``.
    """
    keys = torch.rand(blocks, num_tasks, num_tasks, generator=generator, dtype=torch.float64)
    # Task i itself sorts last (keys are < 1), so the first K-1 entries permute the others.
    keys.diagonal(dim1=1, dim2=2).fill_(2.0)
    return keys.argsort(dim=2)[:, :, : num_tasks - 1]


def pcgrad_coefficients(g: Tensor, order: Tensor) -> Tensor:
    """Coefficients C [K, K] with g_i^PC = sum_m C[i, m] g_m, from the Gramian ``g`` (float64).

    Task i visits the tasks ``order[i]`` in turn and, when its current (already projected)
    gradient conflicts with the ORIGINAL g_j (<g_i^PC, g_j> < 0), projects onto g_j's normal
    plane: g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j. Everything stays in the span of the task
    gradients, so the inner products come from the Gramian; all tasks advance in parallel.
    """
    k = g.shape[0]
    coef = torch.eye(k, dtype=g.dtype)
    cg = g.clone()  # cg[i, m] = <g_i^PC, g_m>
    sq = g.diagonal().clone()
    rows = torch.arange(k)
    for step in range(k - 1):
        p = order[:, step]
        dots = cg[rows, p]
        sq_p = sq[p]
        factor = torch.where((dots < 0) & (sq_p > 0), dots / torch.where(sq_p > 0, sq_p, 1.0), 0.0)
        coef[rows, p] -= factor
        cg -= factor[:, None] * g[p]
    return coef


@register("pcgrad")
class PCGrad(GradientMethod):
    """PCGrad: project each task gradient onto the normal plane of the gradients it conflicts with.

    For each task i, in a random order of the other tasks j (drawn from ``self.generator``),
    if <g_i^PC, g_j> < 0 then g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 g_j, where g_j is
    the ORIGINAL gradient of task j; the update is the SUM d = sum_i g_i^PC (Algorithm 1 of
    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020; the official TensorFlow code also sums the projected gradients; LibMTL
    sums; some PyTorch ports average).

    The projections are computed exactly in the span of the task gradients from the Gramian
    (float64 K x K arithmetic), then d = (sum_i C_i) @ J in one matrix product. A task whose
    gradient is zero neither projects nor is projected onto.

    Departures from the official TF code: it visits every task (itself included, harmlessly)
    in one fixed order because its ``tf.random.shuffle`` result is discarded; we draw a fresh
    random order per task and step as the paper's Algorithm 1 states.

    Args:
        num_tasks: K.
    Needs: the Jacobian.
    Returns weights: None (the update is not a fixed weighting of the task gradients);
        task-specific parameters get their own gradients unscaled, as in the paper.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Yu, Kumar, Gupta, Levine, Hausman & Finn, Gradient Surgery for Multi-Task Learning, "
        "NeurIPS 2020"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        {"positively_homogeneous", "aligned_direction"}
    )
    stochastic: ClassVar[bool] = True

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        k = jacobian.shape[0]
        gram = gramian(jacobian)
        g64 = gram.detach().to("cpu", torch.float64)
        order = partner_orders(self.generator, k)[0]
        coef = pcgrad_coefficients(g64, order)
        combination = coef.sum(dim=0)
        direction = combination.to(dtype=jacobian.dtype, device=jacobian.device) @ jacobian
        return AggregationResult(
            direction=direction,
            weights=None,
            extras={"gramian": gram, "combination": combination},
        )
