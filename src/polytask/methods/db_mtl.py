"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError, InvalidLossesError
from polytask.methods.base import AggregationResult, GradientMethod
from polytask.methods.registry import register

#: The official code's offset: log(L_k + 1e-8), and alpha_k = max_j ||g_j|| / (||g_k|| + 1e-8).
_EPS = 1e-8


@register("db_mtl")
class DBMTL(GradientMethod):
    """DB-MTL: log-transformed losses, and EMA task gradients rescaled to the largest norm.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task Learning",
    arXiv:2308.12029, 2023, as in the authors' code, LibMTL's ``DB_MTL``
    (github.com/median-research-group/LibMTL). Each step t = 1, 2, ...:

        g_k      = grad log(L_k + 1e-8) = grad L_k / (L_k + 1e-8)      (loss-scale balancing)
        beta_t   = beta / t**beta_sigma
        ghat_k  <- beta_t ghat_k + (1 - beta_t) g_k                     (ghat starts at 0)
        d        = sum_k max_j ||ghat_j|| / (||ghat_k|| + 1e-8) ghat_k   (gradient balancing)

    so every task contributes a vector of the largest task's norm along its smoothed gradient.
    The log gradients come from the Jacobian of the losses by the chain rule (no extra backward
    pass). As in the authors' code, task-specific parameters get the gradient of their own log
    loss, 1 / (L_k + 1e-8) times their task gradient (``BackwardResult.head_weights``), with no
    smoothing or rescaling.

    The EMA ghat is a [K, P] buffer created at the first step; it moves with the method
    (``.to``) and is saved by ``state_dict``. Only ``mode="params"`` is supported, as in the
    authors' code: a features-mode EMA would average gradients of different samples.
    :meth:`aggregate` (no losses) applies the gradient balancing to the rows of J as given
    (i.e. takes them as the log losses' gradients) and also advances the EMA.

    Args:
        num_tasks: K.
        beta: EMA factor, in [0, 1); default 0.9 (the authors' code and LibMTL).
        beta_sigma: decay exponent of beta_t, >= 0; default 0 (constant beta).
    Needs: the Jacobian and the losses (which must exceed -1e-8).
    Returns weights: ``None`` (the update combines the smoothed gradients, not the current
    ones); ``extras["alpha"]`` holds the factors max_j ||ghat_j|| / (||ghat_k|| + 1e-8) and
    ``head_weights`` 1 / (L_k + 1e-8).
    """

    paper: ClassVar[str] = (
        "Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, Dual-Balancing for Multi-Task "
        "Learning, arXiv:2308.12029, 2023"
    )
    # With fresh state and K copies of g: d = K (1 - beta) ||g|| / (||g|| + 1e-8) g.
    properties: ClassVar[frozenset[str]] = frozenset({"permutation_invariant", "aligned_direction"})
    modes: ClassVar[frozenset[str]] = frozenset({"params"})

    def __init__(
        self, num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
            raise InvalidHyperparameterError(f"beta={beta!r} must be a number in [0, 1)")
        if (
            isinstance(beta_sigma, bool)
            or not isinstance(beta_sigma, (int, float))
            or not (math.isfinite(beta_sigma) and beta_sigma >= 0)
        ):
            raise InvalidHyperparameterError(f"beta_sigma={beta_sigma!r} must be a number >= 0")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        # ghat: empty until the first step gives the Jacobian's shape.
        self.register_buffer("grad_ema", torch.zeros(0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # ghat is created lazily: take the checkpoint's shape before the values are copied in.
        incoming = state_dict.get(prefix + "grad_ema")
        if isinstance(incoming, Tensor) and incoming.shape != self.grad_ema.shape:
            self.grad_ema = torch.zeros(
                incoming.shape, dtype=incoming.dtype, device=self.grad_ema.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        head_weights = None
        grads = jacobian
        if losses is not None:
            shifted = losses.detach().to(jacobian) + _EPS
            bad = [i for i, ok in enumerate((shifted > 0).tolist()) if not ok]
            if bad:
                raise InvalidLossesError(
                    "DB-MTL takes log(L_k + 1e-8) and needs losses above -1e-8; task(s) "
                    + ", ".join(f"{i} (L={float(losses[i]):.6g})" for i in bad)
                    + " are not; shift those losses to be non-negative"
                )
            head_weights = 1.0 / shifted
            grads = jacobian * head_weights[:, None]
        if self.grad_ema.numel() == 0:
            self.grad_ema = torch.zeros_like(grads)
        elif self.grad_ema.shape != grads.shape:
            raise ValueError(
                f"DB-MTL keeps an EMA of task gradients of shape {tuple(self.grad_ema.shape)} "
                f"but got a Jacobian of shape {tuple(grads.shape)}; the shared parameters must "
                "stay the same across steps"
            )
        if self.grad_ema.device != grads.device:
            self.grad_ema = self.grad_ema.to(grads.device)
        self.step += 1
        beta_t = self.beta / float(self.step) ** self.beta_sigma
        ema = self.grad_ema
        ema.mul_(beta_t).add_(grads.to(ema.dtype), alpha=1.0 - beta_t)
        norms = ema.norm(dim=1)
        alpha = norms.max() / (norms + _EPS)
        direction = (alpha @ ema).to(jacobian.dtype)
        return AggregationResult(
            direction=direction,
            weights=None,
            extras={"alpha": alpha.to(jacobian.dtype), "beta_t": beta_t},
            head_weights=head_weights,
        )
