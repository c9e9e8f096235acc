"""Auto-Lambda: task weights meta-learned by a one-step look-ahead (Liu et al., TMLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError
from polytask.methods.meta import (
    FunctionalModel,
    LossFn,
    MetaMethod,
    MetaStepResult,
    check_hessian,
    check_inner_step,
    check_meta_lr,
    lookahead_hypergradient,
)
from polytask.methods.registry import register


@register("auto_lambda")
class AutoLambda(MetaMethod):
    """Auto-Lambda: learn the task weights lambda so that one training step helps validation.

    The model trains on sum_k lambda_k L_k (:meth:`backward`). Before each step,
    :meth:`meta_step` takes a virtual step theta' = theta - alpha grad_theta sum_k lambda_k
    L_k(theta) on a training batch (alpha: the model optimizer's current learning rate, with its
    momentum and weight decay) and moves lambda by Adam on

        d/dlambda sum_{k in primary} L_k^val(theta'(lambda)),

    the validation loss of the primary tasks after the step. Liu, James, Davison & Johns,
    "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022 (Eq. 3-4; official code
    github.com/lorenmt/auto-lambda). With every task primary (``primary=None``) it is the
    paper's multi-task setting; with a subset, its auxiliary-learning setting, where the other
    tasks are auxiliaries whose weights are learned only for what they do to the primary ones.

    The official code approximates the look-ahead's second-order term by central differences
    (DARTS), which is ``hessian="finite_difference"`` (default: one extra backward and two
    forwards per meta step whatever K). That term is a mixed derivative which for a weighted
    sum is just the task gradients, so ``hessian="exact"`` computes the same hyper-gradient
    exactly from the K task gradients (K backwards; see :mod:`polytask.methods.meta`). The
    weights are unconstrained, as in the official code (no softmax, no clipping).

    Departures from the official code: the virtual and perturbed forwards do not update the
    model's BatchNorm statistics, and the two perturbed forwards share their dropout masks;
    SGD's dampening and Nesterov flag and several parameter groups are honoured (the official
    code reads the first group's momentum and weight decay only).

    Args:
        num_tasks: K.
        primary: indices of the primary tasks whose validation loss is the meta objective;
            default ``None``: all tasks (multi-task learning).
        init: initial value of every lambda_k; default 0.1 (official ``--autol_init``).
        meta_lr: Adam learning rate of lambda; default 1e-4 (official value for NYUv2; 3e-5 for
            CityScapes, 3e-4 for CIFAR-100).
        hessian: ``"finite_difference"`` (official) or ``"exact"``.
    Needs: the losses for :meth:`backward`; :meth:`meta_step` once per step with a training
        and a validation batch (the official code draws the latter from the training set, in
        another order) and the model's SGD optimizer.
    Returns weights: lambda.
    """

    meta_step_distributed: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Liu, James, Davison & Johns, Auto-Lambda: Disentangling Dynamic Task Relationships, "
        "TMLR 2022"
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        primary: Sequence[int] | None = None,
        init: float = 0.1,
        meta_lr: float = 1e-4,
        hessian: str = "finite_difference",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        self.primary = None if primary is None else tuple(_check_primary(primary, num_tasks))
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise InvalidHyperparameterError(f"init={init!r} must be a finite float")
        self.init = float(init)
        self.meta_lr = check_meta_lr(meta_lr)
        self.hessian = check_hessian(hessian)
        mask = torch.zeros(num_tasks)
        mask[list(self.primary) if self.primary is not None else slice(None)] = 1.0
        self.register_buffer("primary_mask", mask)
        self.lambdas = nn.Parameter(torch.full((num_tasks,), self.init))
        self._make_meta_optimizer(self.lambdas, self.meta_lr)

    def task_weights(self) -> Tensor:
        return self.lambdas.detach()

    def meta_step(
        self,
        model: nn.Module,
        train_batch: Any,
        val_batch: Any,
        loss_fn: LossFn,
        *,
        inner_lr: float | None = None,
        inner_optimizer: torch.optim.Optimizer | None = None,
        num_samples: tuple[float, float] | None = None,
    ) -> MetaStepResult:
        """Update lambda by one Adam step on the primary tasks' look-ahead validation loss."""
        check_inner_step(inner_lr, inner_optimizer, sgd_only=True)
        if val_batch is None:
            raise ValueError(
                "AutoLambda.meta_step needs val_batch: a batch the look-ahead model is judged "
                "on (the official code uses another shuffle of the training set)"
            )
        fmodel = FunctionalModel(model, loss_fn, self.num_tasks, type(self).__name__)
        hyper, val, _ = lookahead_hypergradient(
            fmodel,
            train_batch,
            val_batch,
            self.lambdas,
            self.primary_mask[None, :],
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            hessian=self.hessian,
            sync=self.sync,
            num_samples=num_samples,
        )
        grad = hyper[0]
        self._apply_meta_gradient(self.lambdas, grad)
        return MetaStepResult(
            weights=self.task_weights().clone(), meta_gradient=grad, val_losses=val
        )


def _check_primary(primary: Any, num_tasks: int) -> list[int]:
    if isinstance(primary, (str, bytes)) or not isinstance(primary, Sequence):
        raise InvalidHyperparameterError(
            f"primary={primary!r} must be a sequence of task indices, e.g. primary=[0]"
        )
    out = []
    for i in primary:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_tasks:
            raise InvalidHyperparameterError(
                f"primary={list(primary)!r}: {i!r} is not a task index in [0, {num_tasks - 1}]"
            )
        if i in out:
            raise InvalidHyperparameterError(f"primary={list(primary)!r} repeats task {i}")
        out.append(i)
    if not out:
        raise InvalidHyperparameterError(
            "primary=[] names no task; pass the primary task indices, or None for all tasks"
        )
    return out
