"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.autograd import leaves_reached
from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import (
    BackwardResult,
    GramianMethod,
    Mode,
    check_shared_params,
)
from polytask.methods.registry import register
from polytask.solvers.nash import nash_weights


@register("nash_mtl")
class NashMTL(GramianMethod):
    """Nash-MTL: the Nash bargaining solution among the tasks for the shared update.

    The tasks bargain over a direction d in a ball around 0, each with utility <d, g_k>; the
    Nash bargaining solution maximises sum_k log <d, g_k> and is d = sum_k a_k g_k with

        G a = 1/a   (elementwise),   a > 0,   G = J J^T

    (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Section 3 and Algorithm 1). The paper's code approximates a by up
    to 20 steps of a sequence of convex problems in cvxpy; we solve G a = 1/a exactly (damped
    Newton on the strictly convex 1/2 a^T G a - sum_k log a_k,
    :func:`polytask.solvers.nash.nash_weights`), the fixed point that sequence converges to.

    As in the official code, G is divided by its Frobenius norm before solving, for numerical
    conditioning only: the official code's normalisation factor appears in both its objective
    and its constraint and cancels, and here the solution a' of (G/||G||) a' = 1/a' is mapped
    back to a = a' / sqrt(||G||), which solves the paper's G a = 1/a (so ||a^T J|| = sqrt(K)
    whatever the gradients' scale). As in the official code, the shared update is clipped
    to norm ``max_norm`` (official 1.0): c = min(1, max_norm / ||a^T J||), shared parameters
    get c a^T J, and task-specific parameters get the unclipped a_k g_k (the official code
    back-propagates sum_k a_k L_k, then clips only the shared parameters' gradient). The
    reported ``weights`` are c a (so the shared update is weights @ J); ``head_weights`` are a.
    In ``mode="features"`` the clip bounds the gradient w.r.t. the shared representation (the
    only update norm known before the encoder backward), not the parameters' gradient.

    Singular cases (see :mod:`polytask.solvers.nash`): linearly dependent gradients are
    fine as long as some direction decreases every task (K identical gradients give equal
    weights); when none does (0 in the convex hull of the gradients: two exactly opposite
    gradients, or more tasks than gradient dimensions in general position) the bargaining
    problem has no solution and :class:`~polytask.errors.SolverError` is raised, where the
    official code silently reuses the previous step's weights. A task whose gradient is
    exactly zero has no say in d; it is left out of the bargaining and given the mean weight
    of the others (so that its own head still learns).

    Args:
        num_tasks: K.
        max_norm: bound on the norm of the update (official code: 1.0); 0 disables it.
        update_weights_every: recompute the weights every this many ``backward`` calls
            (official default 1). In between, the last unclipped weights are reused with one
            backward pass of sum_k a_k L_k, as in the official code (its "practical
            speed-up"), and the result is clipped in the same way.
        normalize_gramian: solve on G / ||G||_F and map back (better conditioned; the
            solution is the same either way).
    Needs: the Jacobian (Gramian).
    Returns weights: the effective weights c a of the shared update, with c the clipping
    factor (d = (c a) @ J); ``head_weights`` a, the unclipped Nash weights.
    """

    paper: ClassVar[str] = (
        "Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, Multi-Task Learning "
        "as a Bargaining Game, ICML 2022"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        # ||a^T J|| = sqrt(K) before clipping, whatever the scale of J: scale invariant.
        {"non_conflicting", "permutation_invariant", "aligned_direction", "scale_invariant"}
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        normalize_gramian: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise InvalidHyperparameterError(f"max_norm={max_norm!r} must be a number >= 0")
        if not (math.isfinite(max_norm) and max_norm >= 0):
            raise InvalidHyperparameterError(
                f"max_norm={max_norm!r} must be finite and >= 0 (0 disables clipping)"
            )
        if (
            isinstance(update_weights_every, bool)
            or not isinstance(update_weights_every, int)
            or update_weights_every < 1
        ):
            raise InvalidHyperparameterError(
                f"update_weights_every={update_weights_every!r} must be an integer >= 1"
            )
        if not isinstance(normalize_gramian, bool):
            raise InvalidHyperparameterError(
                f"normalize_gramian={normalize_gramian!r} must be True or False"
            )
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.normalize_gramian = normalize_gramian
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_weights", torch.ones(num_tasks, dtype=torch.float64))
        #: (unclipped weights, clipping factor) of the last solve.
        self._last: tuple[Tensor, float] = (torch.ones(num_tasks, dtype=torch.float64), 1.0)

    def _clip_factor(self, norm: Tensor | float) -> float:
        norm = float(norm)
        if self.max_norm > 0 and norm > self.max_norm:
            return self.max_norm / norm
        return 1.0

    def _nash(self, gramian: Tensor) -> tuple[Tensor, float]:
        """Unclipped Nash weights (float64) and the clipping factor."""
        g = gramian.detach().double()
        factor = 1.0
        if self.normalize_gramian:
            norm = float(torch.linalg.matrix_norm(g))
            if norm > 0:
                g = g / norm
                factor = 1.0 / math.sqrt(norm)
        a = nash_weights(g).weights * factor
        sq = float(a @ gramian.detach().double() @ a)
        return a, self._clip_factor(math.sqrt(max(sq, 0.0)))

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        a, c = self._nash(gramian)
        # Kept for the heads (updated with the unclipped weights, as the official code) and
        # the diagnostics of this step.
        self._last = (a.to(gramian.dtype), c)
        return (c * a).to(gramian.dtype)

    def _head_weights(self, weights: Tensor) -> Tensor | None:
        a, c = self._last
        return None if c == 1.0 else a.to(weights)

    def _weight_extras(self) -> dict[str, Any]:
        a, c = self._last
        return {"nash_weights": a, "clip_coef": c}

    def backward(  # type: ignore[override]
        self,
        losses: Tensor,
        *,
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        mode: Mode = "params",
        **ctx: Any,
    ) -> BackwardResult:
        partial = self._partial_step(losses, shared_params, features, mode, ctx)
        if partial is not None:  # under polytask.distributed: the ranks' batches differ
            return partial
        shared = check_shared_params(shared_params)
        fresh = int(self.step) % self.update_weights_every == 0
        if fresh:
            result = super().backward(
                losses, shared_params=shared, features=features, mode=mode, **ctx
            )
            if not result.extras.get("found_inf"):  # an overflowed fp16 step solved nothing
                self.last_weights.copy_(result.extras["nash_weights"].detach())
        else:
            result = self._reuse_weights(losses, shared, features, mode, ctx)
        self.step.add_(1)
        return result

    def _reuse_weights(
        self,
        losses: Tensor,
        shared: list[Tensor],
        features: Tensor | None,
        mode: Mode,
        ctx: dict[str, Any],
    ) -> BackwardResult:
        """One backward pass of sum_k a_k L_k with the last weights, clipped like a fresh step."""
        losses, shared = self._validate(losses, shared, mode, features, ctx)
        if self.sync is not None:
            from polytask.distributed.backward import fixed_weights_backward

            return fixed_weights_backward(
                self, losses, shared, features, mode, ctx, self.last_weights, self._clip_factor
            )
        ctx.pop("num_samples", None)
        # Scaled losses (fp16 loss scaling) scale the gradients; the clip sees true norms.
        scale = ctx.pop("loss_scale", None) or 1.0
        a = self.last_weights.to(losses.detach())
        total = (a * losses).sum()
        if mode == "features":
            assert features is not None
            heads = leaves_reached([losses], stop_at=[features])
            (grad_f,) = torch.autograd.grad(total, features, retain_graph=True)
            c = self._clip_factor(grad_f.norm() / scale)
            if heads:
                torch.autograd.backward(total, inputs=heads, retain_graph=True)
            features.backward(c * grad_f)
        else:
            heads = leaves_reached([losses], exclude=shared)
            inputs = [*shared, *heads]
            grads = torch.autograd.grad(total, inputs, allow_unused=True)
            shared_grads = [g for g in grads[: len(shared)] if g is not None]
            norm = (
                torch.linalg.vector_norm(torch.stack([g.norm() for g in shared_grads]))
                if shared_grads
                else 0.0
            )
            c = self._clip_factor(norm / scale)
            # Only the shared update is clipped, as in the official code.
            factors = [c] * len(shared) + [1.0] * len(heads)
            for p, g, f in zip(inputs, grads, factors):
                g = torch.zeros_like(p) if g is None else f * g
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g.detach())
        weights = (c * a).detach()
        return BackwardResult(
            weights=weights,
            extras={"reused_weights": True, "nash_weights": a.detach(), "clip_coef": c},
            head_weights=a.detach(),
        )
