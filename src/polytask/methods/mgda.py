"""MGDA: the multiple-gradient descent algorithm (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register
from polytask.solvers import min_norm_simplex

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda")
class MGDA(GramianMethod):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    d = sum_k w_k g_k with w = argmin_{w in simplex} ||sum_k w_k g_k||^2 (Désidéri 2012),
    as used for deep MTL by Sener & Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018. ``mode="features"`` balances the Jacobian w.r.t. the shared
    representation: MGDA-UB, the paper's upper-bound variant with one backward pass through
    the encoder. The weights are found exactly by Wolfe's min-norm-point algorithm.

    Args:
        num_tasks: K.
        normalization: gradient normalisation before solving, as in the paper's code
            (which calls it optional and not part of the paper): ``"none"`` (default; the
            algorithm as stated in the paper), ``"l2"`` (g_k/||g_k||), ``"loss"`` (g_k/L_k),
            ``"loss+"`` (g_k/(L_k ||g_k||); the setting of the official code's sample
            config). With a normalisation the update is not guaranteed conflict-free.
    Needs: the Jacobian (Gramian); ``"loss"`` normalisations also use the losses.
    Returns weights: the simplex weights w found on the normalised gradients, applied (as in
        the paper's code, which back-propagates sum_k w_k L_k) to the raw gradients:
        d = weights @ J. LibMTL instead applies them to the normalised gradients.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        {"non_conflicting", "permutation_invariant", "positively_homogeneous", "aligned_identity"}
    )

    def __init__(self, num_tasks: int, *, normalization: str = "none", **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if normalization not in _NORMALIZATIONS:
            raise InvalidHyperparameterError(
                f"normalization={normalization!r} must be one of {', '.join(_NORMALIZATIONS)}"
            )
        if normalization != "none":
            # The weights are found on normalised gradients but applied to the raw ones, so
            # the update can conflict with a task (J = [[1, 0], [-100, 10]] with "l2").
            self.properties = frozenset({"permutation_invariant"})
        self.normalization = normalization

    def _normalizers(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization == "none":
            return torch.ones_like(norms)
        if self.normalization == "l2":
            return norms.clamp_min(1e-12)
        if losses is None:
            raise InvalidHyperparameterError(
                f"normalization={self.normalization!r} needs the losses; call backward(...) "
                "rather than weights_from_gramian/aggregate"
            )
        losses = losses.to(gramian)
        if self.normalization == "loss":
            return losses.clamp_min(1e-12)
        return (losses * norms).clamp_min(1e-12)

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        n = self._normalizers(gramian, losses)
        scaled = gramian / (n[:, None] * n[None, :])
        return min_norm_simplex(scaled)
