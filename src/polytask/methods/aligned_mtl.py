"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods._preference import is_uniform, preference_vector
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register

_SCALE_MODES = ("min", "median", "rmse")


@register("aligned_mtl")
class AlignedMTL(GramianMethod):
    """Aligned-MTL: make the task gradients orthogonal with equal norms, then combine them.

    With the eigendecomposition G = V diag(lambda) V^T of the Gramian (rank R, eigenvalues
    lambda_1 >= ... >= lambda_R > 0), the balance transformation

        B = sqrt(lambda_R) V_R diag(lambda_R^{-1/2}) V_R^T

    turns the gradients into aligned ones, the rows of B J, which are orthogonal with equal
    norm sqrt(lambda_R) on the span of the gradients (condition number 1), and the update is
    d = w^T B J for pre-defined task weights w (Senushkin, Patakin, Kuznetsov & Konushin,
    "Independent Component Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1). As in
    the official code (SamsungLabs/MTL, ``ProcrustesSolver``): the rank counts the
    eigenvalues above max(lambda) K eps (eps of the Gramian's dtype; the official code uses
    float32's), the rest are dropped, and w is all ones (the aligned gradients are summed;
    torchjd's ``AlignedMTL`` averages them instead, i.e. w = 1/K). ``scale_mode`` picks the
    scale sqrt(lambda_R) ("min", the paper's), the lower median eigenvalue ("median", as
    ``torch.median``) or the mean eigenvalue ("rmse"), the official code's options. With all
    gradients zero, d = 0 and the weights are w.

    Deviation from the official code: task-specific parameters get their task's gradient
    times the Aligned-MTL weight (polytask's convention, the official
    ``scale_decoder_grad=True``); the official default leaves them unweighted.

    Args:
        num_tasks: K.
        pref_vector: pre-defined task weights w [K] (default all ones, the official sum).
        scale_mode: "min" (default), "median" or "rmse".
    Needs: the Jacobian (Gramian).
    Returns weights: B w, with d = (B w) @ J.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Senushkin, Patakin, Kuznetsov & Konushin, Independent Component Alignment for "
        "Multi-Task Learning, CVPR 2023"
    )
    properties: ClassVar[frozenset[str]] = frozenset(
        {"permutation_invariant", "positively_homogeneous", "aligned_direction"}
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        pref_vector: Sequence[float] | None = None,
        scale_mode: str = "min",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if scale_mode not in _SCALE_MODES:
            raise InvalidHyperparameterError(
                f"scale_mode={scale_mode!r} must be one of {', '.join(_SCALE_MODES)}"
            )
        pref = preference_vector(pref_vector, num_tasks, default=1.0, nonnegative=False)
        if not is_uniform(pref):
            self.properties = frozenset({"positively_homogeneous"})
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode
        self.register_buffer("pref", pref, persistent=False)

    def balance_transformation(self, gramian: Tensor) -> Tensor:
        """The K x K matrix B of Algorithm 1 (in G's dtype and device)."""
        return torch.as_tensor(self._balance(gramian), dtype=gramian.dtype, device=gramian.device)

    def _balance(self, gramian: Tensor) -> np.ndarray:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        g = 0.5 * (g + g.T)
        k = g.shape[0]
        lam, vec = np.linalg.eigh(g)
        top = float(lam.max()) if k else 0.0
        keep = lam > top * k * float(torch.finfo(gramian.dtype).eps)
        if top <= 0 or not keep.any():
            return np.zeros((k, k))
        lam, vec = lam[keep], vec[:, keep]
        if self.scale_mode == "min":
            scale = float(lam.min())
        elif self.scale_mode == "median":
            scale = float(np.sort(lam)[(lam.size - 1) // 2])  # torch.median: lower median
        else:
            scale = float(lam.mean())
        return (vec * np.sqrt(scale / lam)) @ vec.T

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        pref = self.pref.to("cpu", torch.float64).numpy()
        b = self._balance(gramian)
        w = b @ pref if b.any() else pref
        return torch.as_tensor(w, dtype=gramian.dtype, device=gramian.device)
