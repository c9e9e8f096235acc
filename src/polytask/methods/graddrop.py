"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import AggregationResult, GradientMethod
from polytask.methods.registry import register


@register("graddrop")
class GradDrop(GradientMethod):
    """GradDrop: per coordinate, keep only the task gradients of one randomly chosen sign.

    With S_k the task gradients, the positive sign purity is
    P = (1/2) (1 + sum_k S_k / sum_k |S_k|) per coordinate; with U ~ Uniform(0, 1) per
    coordinate (from ``self.generator``), the mask
    M_k = 1[P > U] 1[S_k > 0] + 1[P < U] 1[S_k < 0] keeps the positive gradients with
    probability P and the negative ones otherwise; with leak l_k in [0, 1] the mask becomes
    l_k + (1 - l_k) M_k, and the update is d = sum_k (l_k + (1 - l_k) M_k) g_k.
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1 (f = identity).

    Where it acts: the paper applies GradDrop to a shared activation layer, which is exactly
    ``mode="features"``; there, as in the paper's batch-separated case and the official code
    (lingvo ``GradDrop`` with its defaults ``use_input_sign_only`` and
    ``marginalize_batch_dim``), the sign statistics are S_k = sum_batch sign(A) * dL_k/dA
    (A the features, batch on dim 0), and the per-feature mask multiplies every sample's
    gradient. With ``marginalize_batch=False``, or in ``mode="params"``, or through
    :meth:`aggregate`, S_k = g_k and GradDrop acts per coordinate of the Jacobian (per
    parameter entry in params mode): an extension, not the paper's setting. The official
    code's optional gradient-norm rescaling (``keep_gradnorm_constant``) is not applied.

    Args:
        num_tasks: K.
        leak: leak l in [0, 1], one value or one per task; paper default 0 (pure GradDrop:
            every gradient can be dropped). l_k = 1 lets task k through unchanged.
        marginalize_batch: in features mode, sum sign(A) * gradient over the batch dimension
            before computing P and the masks (paper and official code: True).
    Needs: the Jacobian (features mode: the features tensor, passed to backward anyway).
    Returns weights: None; task-specific parameters get their own gradients unscaled.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, Just Pick a Sign: Optimizing "
        "Deep Multitask Models with Gradient Sign Dropout, NeurIPS 2020"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        {"positively_homogeneous", "aligned_direction"}
    )
    stochastic: ClassVar[bool] = True

    def __init__(
        self,
        num_tasks: int,
        *,
        leak: float | Sequence[float] = 0.0,
        marginalize_batch: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        values = [leak] if isinstance(leak, (int, float)) else list(leak)
        if len(values) not in (1, num_tasks) or any(
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not 0.0 <= v <= 1.0
            for v in values
        ):
            raise InvalidHyperparameterError(
                f"leak={leak!r} must be a number in [0, 1] or {num_tasks} such numbers"
            )
        if not isinstance(marginalize_batch, bool):
            raise InvalidHyperparameterError(
                f"marginalize_batch={marginalize_batch!r} must be True or False"
            )
        self.leak = leak
        self.marginalize_batch = marginalize_batch
        self._leaks = tuple(float(v) for v in values) * (num_tasks if len(values) == 1 else 1)

    def _uniform(self, n: int, like: Tensor) -> Tensor:
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        u = torch.rand(n, generator=self.generator, dtype=dtype)
        return u.to(device=like.device, dtype=like.dtype)

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        k, total = jacobian.shape
        features = ctx.get("features")
        use_batch = (
            self.marginalize_batch
            and ctx.get("mode") == "features"
            and isinstance(features, Tensor)
            and features.dim() >= 2
            and features.numel() == total
        )
        if use_batch:
            activations = features.detach()
            batch = activations.shape[0]
            grads = jacobian.reshape(k, batch, -1)
            signs = torch.sign(activations).reshape(1, batch, -1).to(jacobian.dtype)
            stats = (grads * signs).sum(dim=1)  # [K, F]
        else:
            grads = jacobian.reshape(k, 1, total)
            stats = jacobian  # [K, P]
        total_abs = stats.abs().sum(dim=0)
        purity = 0.5 * (1.0 + stats.sum(dim=0) / torch.where(total_abs > 0, total_abs, 1.0))
        u = self._uniform(purity.numel(), purity)
        mask = ((purity > u) & (stats > 0)) | ((purity < u) & (stats < 0))
        leak = torch.tensor(self._leaks, dtype=jacobian.dtype, device=jacobian.device)[:, None]
        keep = leak + (1.0 - leak) * mask.to(jacobian.dtype)  # [K, F]
        direction = (keep[:, None, :] * grads).sum(dim=0).reshape(total)
        kept = mask.to(jacobian.dtype).mean()
        return AggregationResult(
            direction=direction, weights=None, extras={"kept_fraction": kept.detach()}
        )
