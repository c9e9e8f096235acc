"""FAMO: fast adaptive multitask optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import (
    InvalidHyperparameterError,
    InvalidLossesError,
    MethodStateError,
    NonFiniteError,
)
from polytask.methods.base import LossMethod
from polytask.methods.registry import register

#: The official code's offset inside every log: log(L_k - min_loss_k + 1e-8).
_EPS = 1e-8
#: torch.optim.Adam's defaults, which the official code uses for the logits.
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def _positive(name: str, value: Any, *, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidHyperparameterError(f"{name}={value!r} must be a finite number {bound}")
    return float(value)


@register("famo")
class FAMO(LossMethod):
    """FAMO: O(1) loss weighting that makes every task's log-loss fall at the same rate.

    Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    as in the official code (github.com/Cranial-XIX/FAMO, ``famo.py`` and
    ``methods/weight_methods.py``). With logits xi [K] (init 0), z = softmax(xi),
    D_k = L_k - m_k + 1e-8 (m: the losses' lower bounds, default 0) and c = sum_k z_k / D_k
    (treated as a constant), each step minimises

        sum_k z_k log D_k / c,   so the effective weights are w_k = z_k / (c D_k), sum_k w_k = 1.

    After ``optimizer.step()``, :meth:`after_step` gets the same batch's losses L' recomputed
    under ``torch.no_grad()`` and moves the logits by the observed log-loss decrease
    delta_k = log D_k - log D'_k: the logits' gradient is (dz/dxi)^T delta, and they take one
    Adam step (lr ``w_lr``, L2 weight decay ``gamma``, torch.optim.Adam's betas (0.9, 0.999)
    and eps 1e-8), as the official code does with ``torch.optim.Adam([xi], lr=w_lr,
    weight_decay=gamma)``. Tasks whose loss fell the most lose weight.

    The logits and the Adam moments are buffers of this module (not parameters: the model's
    optimizer must not train them), so ``state_dict`` checkpoints the whole method, including
    the losses of a step whose :meth:`after_step` is still due. Adam runs on the buffers
    here, in the logits' dtype; the log-loss decrease is computed in float64.

    Departures from the official code:

    * no gradient clipping: the official ``famo.py`` example clips the shared gradient to norm
      1 after the backward pass, while its benchmark trainers call the clip before the
      backward pass (on zeroed gradients, so it does nothing). Clipping is the training
      loop's choice (``torch.nn.utils.clip_grad_norm_``); the reported weights stay exact.
    * a loss at or below its lower bound (log of a non-positive number, NaN in the official
      code) raises :class:`~polytask.errors.InvalidLossesError`.

    Args:
        num_tasks: K.
        gamma: weight decay of the logits, >= 0. Paper/official scripts: 1e-3 on NYU-v2,
            CelebA and QM9 (the default here, as in LibMTL's FAMO), 1e-2 on Cityscapes, 0 on
            the toy problem.
        w_lr: learning rate of the logits' Adam, > 0; default 0.025 (paper and official code).
        min_losses: lower bounds m [K] of the losses (official ``set_min_losses``); default 0.
    Needs: the losses, and ``after_step(losses)`` after every ``optimizer.step()``
        (``needs_losses_after_step`` is True).
    Returns weights: z_k / (c D_k), the gradient of the objective w.r.t. L_k (sums to 1).
    """

    paper: ClassVar[str] = (
        "Liu, Liu, Jin, Stone & Liu, FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023"
    )
    needs_losses_after_step: ClassVar[bool] = True

    def __init__(
        self,
        num_tasks: int,
        *,
        gamma: float = 1e-3,
        w_lr: float = 0.025,
        min_losses: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        self.gamma = _positive("gamma", gamma, allow_zero=True)
        self.w_lr = _positive("w_lr", w_lr, allow_zero=False)
        if min_losses is None:
            floor = torch.zeros(num_tasks, dtype=torch.float64)
        else:
            try:
                floor = torch.as_tensor(list(min_losses), dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                floor = None  # not a sequence of numbers: the error below names it
            shape_ok = floor is not None and floor.shape == (num_tasks,)
            if not shape_ok or not bool(torch.isfinite(floor).all()):
                raise InvalidHyperparameterError(
                    f"min_losses={min_losses!r} must hold {num_tasks} finite numbers "
                    "(one lower bound per task)"
                )
        self.min_losses = None if min_losses is None else tuple(floor.tolist())
        self.register_buffer("loss_floor", floor)
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        # The losses of the last backward, awaiting after_step.
        self.register_buffer("prev_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    @property
    def task_probabilities(self) -> Tensor:
        """z = softmax(xi), the weights before the 1 / (c D_k) rescaling."""
        return torch.softmax(self.logits.detach(), dim=0)

    def _log_gaps(self, losses: Tensor, where: str) -> Tensor:
        """log(L_k - m_k + 1e-8) in float64, or an error naming the tasks at their bound."""
        gaps = losses.detach().to(torch.float64) - self.loss_floor.to(losses.device) + _EPS
        bad = [i for i, ok in enumerate((gaps > 0).tolist()) if not ok]
        if bad:
            values = losses.detach().tolist()
            raise InvalidLossesError(
                f"FAMO takes log(L_k - min_loss_k + 1e-8), but in {where} task(s) "
                + ", ".join(f"{i} (L={values[i]:.6g})" for i in bad)
                + f" are at or below their lower bound min_losses={self.loss_floor.tolist()}; "
                "pass min_losses= with bounds below every reachable loss"
            )
        return gaps.log()

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        self._log_gaps(losses, "backward")
        z = torch.softmax(self.logits.detach().to(losses), dim=0)
        gaps = losses - self.loss_floor.to(losses) + _EPS
        c = (z / gaps.detach()).sum()
        total = (z * gaps.log()).sum() / c
        self.prev_losses.copy_(losses.detach().to(self.prev_losses))
        self.pending.fill_(True)
        return total, z / (c * gaps.detach())

    @torch.no_grad()
    def _after_step(self, losses: Tensor) -> None:
        """Update the logits from the loss decrease of the step just taken.

        Args:
            losses: [K] the same batch's task losses, recomputed after ``optimizer.step()``
                (under ``torch.no_grad()``).
        """
        if not bool(self.pending):
            raise MethodStateError(
                "FAMO.after_step was called without a preceding FAMO.backward (or twice for "
                "one backward); call method.backward(losses, ...), optimizer.step(), then "
                "method.after_step(new_losses) once per step"
            )
        if not isinstance(losses, Tensor) or losses.shape != (self.num_tasks,):
            raise InvalidLossesError(
                f"after_step needs a 1-D tensor of the {self.num_tasks} task losses recomputed "
                f"after optimizer.step(), got "
                f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}"
            )
        if not bool(torch.isfinite(losses.detach()).all()):
            raise NonFiniteError(
                f"after_step got non-finite losses {losses.detach().tolist()}; the optimizer "
                "step diverged (lower the learning rate)"
            )
        new = self._log_gaps(losses, "after_step")
        old = (self.prev_losses - self.loss_floor + _EPS).log()
        delta = old - new.to(old.device)
        xi = self.logits
        z = torch.softmax(xi.to(torch.float64), dim=0)
        # (dz/dxi)^T delta for the softmax Jacobian diag(z) - z z^T.
        grad = (z * (delta - (z * delta).sum())).to(xi)
        self._adam_step(grad)
        self.pending.fill_(False)

    def _adam_step(self, grad: Tensor) -> None:
        """One step of torch.optim.Adam (L2 weight decay, no amsgrad) on the logits buffer."""
        beta1, beta2 = _BETAS
        self.adam_step += 1
        t = int(self.adam_step)
        grad = grad + self.gamma * self.logits
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.w_lr / (1 - beta1**t)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(_ADAM_EPS)
        self.logits.addcdiv_(self.exp_avg, denom, value=-step_size)
