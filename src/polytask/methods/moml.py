"""MOML: multi-objective meta learning of the task weights (Ye et al., NeurIPS 2021)."""

from __future__ import annotations

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
from polytask.solvers import min_norm_simplex

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
#: KKT tolerance of the upper-level min-norm problem, relative to max(diag G).
_MGDA_TOL = 1e-8


@register("moml")
class MOML(MetaMethod):
    """MOML: task weights lambda = softmax(s) from a multi-objective bi-level problem.

    Lower level: the model minimises sum_k lambda_k L_k (:meth:`backward`). Upper level:
    the K validation losses V_k(theta'(s)) after one virtual SGD step
    theta' = theta - alpha grad_theta sum_k lambda_k L_k(theta), solved as a multi-objective
    problem by MGDA: :meth:`meta_step` computes the K hyper-gradients G_k = dV_k/ds, the
    min-norm weights gamma in the simplex of the (normalised) G_k
    (:func:`polytask.solvers.min_norm_simplex`), and takes an Adam step on s along
    sum_k gamma_k G_k. Ye, Lin, Yue, Guo, Xiao & Zhang, "Multi-Objective Meta Learning",
    NeurIPS 2021 (Algorithm 1; official code github.com/Baijiong-Lin/MOML, ``MTL/``).

    As in the official code: lambda = softmax(s) with s initialised to 1/K (uniform weights),
    the MGDA weights found on the normalised hyper-gradients and applied to the raw ones
    (back-propagating sum_k gamma_k V_k), exact second-order hyper-gradients (the official code
    differentiates through the step with ``create_graph=True``; ``hessian="exact"`` gets the
    same numbers from the K task gradients, see :mod:`polytask.methods.meta`), and a plain
    SGD virtual step: pass ``inner_lr=`` the model's learning rate (1e-4 in the official code,
    whose model is trained with Adam) or the model's ``torch.optim.SGD``.

    Args:
        num_tasks: K.
        meta_lr: Adam learning rate of s; default 1e-4 (official NYUv2 setting; 1e-3 for
            Office-31 / Office-Home).
        normalization: of the hyper-gradients before MGDA: ``"l2"`` (default; the official
            Office-31/Office-Home script, ``moml_office.py``; its NYUv2 script,
            ``moml_nyu.py``, uses ``"loss"``),
            ``"none"``, ``"loss"``, ``"loss+"`` (as :class:`polytask.methods.mgda.MGDA`).
        hessian: ``"exact"`` (default) or ``"finite_difference"`` (2K forwards instead of K
            backwards).
    Needs: the losses for :meth:`backward`; :meth:`meta_step` with a training batch (the
        virtual step) and a validation batch (the upper level) once per step.
    Returns weights: softmax(s) (sums to 1).
    """

    meta_step_distributed: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Ye, Lin, Yue, Guo, Xiao & Zhang, Multi-Objective Meta Learning, NeurIPS 2021"
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        meta_lr: float = 1e-4,
        normalization: str = "l2",
        hessian: str = "exact",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        self.meta_lr = check_meta_lr(meta_lr)
        if normalization not in _NORMALIZATIONS:
            raise InvalidHyperparameterError(
                f"normalization={normalization!r} must be one of {', '.join(_NORMALIZATIONS)}"
            )
        self.normalization = normalization
        self.hessian = check_hessian(hessian)
        self.logits = nn.Parameter(torch.full((num_tasks,), 1.0 / num_tasks))
        self._make_meta_optimizer(self.logits, self.meta_lr)

    def task_weights(self) -> Tensor:
        return torch.softmax(self.logits.detach(), dim=0)

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
        """Update s by one Adam step along the MGDA combination of the K hyper-gradients."""
        check_inner_step(inner_lr, inner_optimizer, sgd_only=True)
        if val_batch is None:
            raise ValueError(
                "MOML.meta_step needs val_batch: a held-out batch whose K task losses are the "
                "upper-level objectives"
            )
        fmodel = FunctionalModel(model, loss_fn, self.num_tasks, type(self).__name__)
        # In float64: the chain rule below differences products of weights.
        lam = torch.softmax(self.logits.detach().double(), dim=0)
        hyper, val, _ = lookahead_hypergradient(
            fmodel,
            train_batch,
            val_batch,
            lam,
            torch.eye(self.num_tasks),
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            hessian=self.hessian,
            sync=self.sync,
            num_samples=num_samples,
        )
        # Chain rule through lambda = softmax(s): d lambda / d s = diag(lambda) - lambda lambda^T.
        lam = lam.to(hyper)
        grads_s = hyper @ (torch.diag(lam) - lam[:, None] * lam[None, :])
        gamma = self._mgda(grads_s, val)
        grad = gamma @ grads_s
        self._apply_meta_gradient(self.logits, grad)
        return MetaStepResult(
            weights=self.task_weights().clone(),
            meta_gradient=grad,
            val_losses=val,
            extras={"mgda_weights": gamma, "hypergradients": grads_s},
        )

    def _mgda(self, grads: Tensor, val: Tensor) -> Tensor:
        norms = grads.norm(dim=1)
        if self.normalization == "none":
            scale = torch.ones_like(norms)
        elif self.normalization == "l2":
            scale = norms
        elif self.normalization == "loss":
            scale = val.to(norms)
        else:
            scale = val.to(norms) * norms
        # A zero hyper-gradient stays zero (the official code would divide by zero).
        scaled = grads / scale.clamp_min(1e-12)[:, None]
        # The K hyper-gradients w.r.t. s are orthogonal to (1, ..., 1) (softmax is shift
        # invariant), so their Gramian has rank < K, and once every objective wants the same
        # change they are nearly equal: the exact solver then reaches a KKT residual of ~1e-9
        # of max(diag G), not 1e-10. Any gamma that near-optimal moves s the same way.
        return min_norm_simplex(scaled @ scaled.T, tol=_MGDA_TOL)
