"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError, NonFiniteError
from polytask.methods.base import AggregationResult, GradientMethod
from polytask.methods.registry import register

#: The official code's offset in the AdaGrad-style Hessian estimate sqrt(sum g^2 + 1e-7).
_EPS = 1e-7


@register("excess_mtl")
class ExcessMTL(GradientMethod):
    """ExcessMTL: weights grow with each task's estimated excess risk (distance to convergence).

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024, as in the official code (github.com/yifei-he/ExcessMTL,
    ``LibMTL/weighting/ExcessMTL.py``, also in LibMTL). The excess risk of task k is
    estimated by a second-order Taylor expansion with the diagonal AdaGrad-style Hessian
    estimate H_k = diag(sqrt(sum_{s<=t} g_{k,s}^2 + 1e-7)):

        e_k = g_k^T H_k^{-1} g_k,

    normalised by its value at the first step, e_k / e_k(1), and the weights take an
    exponentiated-gradient (mirror ascent) step, renormalised to sum to K:

        w_k <- w_k exp(eta e_k / e_k(1)),   w <- K w / sum(w)     (w starts at 1; no update
                                                                   at the first step)

    Shared parameters get w @ J and task-specific parameters w_k times their task gradient
    (the official code back-propagates sum_k w_k L_k). Tasks further from convergence gain
    weight, while a task whose loss stays high only because of label noise (a large Bayes
    error but a small excess risk) does not.

    The renormalised update is computed as K softmax(log w + eta e / e(1)), the same numbers
    as the official w exp(...) / sum without its overflow to inf for large eta e / e(1).

    In ``mode="features"`` the task gradients w.r.t. the representation are summed over the
    batch (first) dimension before the estimate, as the official code does with LibMTL's
    representation gradients, so the accumulated sum of squares has a batch-independent shape.
    The accumulator is a buffer created at the first step and saved by ``state_dict``.

    A task whose first-step estimate is 0 (a zero gradient at the first step) has no
    normalisation; the official code divides by zero there, here the second step raises
    :class:`~polytask.errors.NonFiniteError` naming it.

    Args:
        num_tasks: K.
        robust_step_size: eta, the step size of the weight update, > 0; default 1e-2 (the
            official code's and LibMTL's default; its Office-Home example uses 1).
    Needs: the Jacobian.
    Returns weights: w (sums to K), so the shared update is weights @ J.
    """

    paper: ClassVar[str] = (
        "He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, Robust Multi-Task Learning with "
        "Excess Risks, ICML 2024"
    )
    # With fresh state w = 1, so d = sum_k g_k (linear in J, K g for K copies of g).
    properties: ClassVar[frozenset[str]] = frozenset(
        {"permutation_invariant", "positively_homogeneous", "aligned_direction"}
    )

    def __init__(self, num_tasks: int, *, robust_step_size: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if (
            isinstance(robust_step_size, bool)
            or not isinstance(robust_step_size, (int, float))
            or not (math.isfinite(robust_step_size) and robust_step_size > 0)
        ):
            raise InvalidHyperparameterError(
                f"robust_step_size={robust_step_size!r} must be a finite number > 0"
            )
        self.robust_step_size = float(robust_step_size)
        # sum of squared gradients: empty until the first step gives the gradients' shape.
        self.register_buffer("grad_sq_sum", torch.zeros(0))
        self.register_buffer("initial_risk", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("has_initial_risk", torch.zeros((), dtype=torch.bool))
        self.register_buffer("task_weights", torch.ones(num_tasks, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The accumulator is created lazily: take the checkpoint's shape before copying.
        incoming = state_dict.get(prefix + "grad_sq_sum")
        if isinstance(incoming, Tensor) and incoming.shape != self.grad_sq_sum.shape:
            self.grad_sq_sum = torch.zeros(
                incoming.shape, dtype=incoming.dtype, device=self.grad_sq_sum.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _excess_risks(self, grads: Tensor) -> Tensor:
        """Accumulate g^2 and return e_k = sum_i g_ki^2 / sqrt(sum_s g_ki,s^2 + 1e-7) [K]."""
        if self.grad_sq_sum.numel() == 0:
            self.grad_sq_sum = torch.zeros_like(grads)
        elif self.grad_sq_sum.shape != grads.shape:
            raise ValueError(
                f"ExcessMTL accumulates squared task gradients of shape "
                f"{tuple(self.grad_sq_sum.shape)} but got {tuple(grads.shape)}; the shared "
                "parameters (or, in features mode, the feature shape) must stay the same"
            )
        if self.grad_sq_sum.device != grads.device:
            self.grad_sq_sum = self.grad_sq_sum.to(grads.device)
        acc = self.grad_sq_sum
        squares = grads.to(acc.dtype).square()
        acc.add_(squares)
        return (squares / (acc + _EPS).sqrt()).sum(dim=1).to(torch.float64)

    def _aggregate(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        *,
        mode: str = "params",
        features: Tensor | None = None,
        **ctx: Any,
    ) -> AggregationResult:
        grads = jacobian
        if mode == "features" and features is not None and features.dim() > 1:
            grads = jacobian.reshape(self.num_tasks, features.shape[0], -1).sum(dim=1)
        risks = self._excess_risks(grads).to(self.task_weights.device)
        if not bool(self.has_initial_risk):
            self.initial_risk.copy_(risks)
            self.has_initial_risk.fill_(True)
        else:
            zero = [i for i, r in enumerate(self.initial_risk.tolist()) if not r > 0]
            if zero:
                raise NonFiniteError(
                    f"ExcessMTL divides each excess-risk estimate by its first-step value, which "
                    f"is 0 for task(s) {zero} (a zero gradient at the first step); make sure "
                    "every task's loss depends on the shared parameters from the first step"
                )
            # w exp(eta r) / sum(...) as a softmax of the logs: no overflow for large eta r.
            logits = self.task_weights.log() + self.robust_step_size * risks / self.initial_risk
            self.task_weights.copy_(self.num_tasks * torch.softmax(logits, dim=0))
        # A copy: the reported weights must not change with the buffer at later steps.
        weights = self.task_weights.to(device=jacobian.device, dtype=jacobian.dtype, copy=True)
        return AggregationResult(
            direction=weights @ jacobian,
            weights=weights,
            extras={"excess_risk": risks.to(jacobian.dtype)},
        )
