"""ConFIG: conflict-free updates with equal angles to every task (Liu et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.methods._preference import is_uniform, preference_vector
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register

_ZERO_REL = float(np.finfo(np.float64).eps) ** 2


@register("config")
class ConFIG(GramianMethod):
    """ConFIG: the direction with equal cosines to every task gradient, rescaled.

    With unit gradients u_k = g_k / ||g_k|| (rows of U) and task weights p (all ones by
    default), the unit direction is d_u = x / ||x|| with x = U^+ p (pseudo-inverse: U x = p
    when the gradients are independent, so <d_u, u_k> = p_k / ||x||, equal for all tasks),
    and the update is d = (sum_k <g_k, d_u>) d_u (Liu, Chu, Thuerey et al., "ConFIG:
    Towards Conflict-free Training of Physics Informed Neural Networks", 2024, Eq. 2;
    official ``conflictfree.grad_operator.ConFIG_update`` with ``EqualWeight`` and
    ``ProjectionLength``). With aligned gradients, d is their sum. d conflicts with no task
    when the gradients are linearly independent (the paper's setting); otherwise U x = p may
    have no solution, and x = U^+ p, its least-squares compromise (as in the official code),
    can conflict with some task (e.g. gradients u, -u, u give cosines 1/3, -1/3, 1/3).

    Everything goes through the Gramian: U^+ = U^T (U U^T)^+ and U U^T = C, the cosine
    matrix D^{-1/2} G D^{-1/2} (D = diag(G)), so x = J^T b with b = D^{-1/2} C^+ p, and
    d = (1^T G b / b^T G b) b @ J. ConFIG is therefore a Gramian method here (the official
    code works on the Jacobian). C^+ drops the eigenvalues of C below max eigenvalue times 10 K
    eps (eps of the Gramian's dtype), the round-off level of a Gramian; the official
    ``torch.linalg.lstsq``/``pinv`` on U cut singular values below eps max(K, P) times the
    largest, a threshold that grows with the number of parameters P. For two tasks the
    official operator uses a closed form (``ConFIG_update_double``) that gives the same
    direction (and NaN for parallel gradients, where this one gives their sum). A task whose
    gradient is exactly zero has u_k = 0, as in the official code (``nan_to_num``).

    Args:
        num_tasks: K.
        pref_vector: task weights p [K] >= 0 setting the relative cosines (default ones).
    Needs: the Jacobian (Gramian).
    Returns weights: the w with d = w @ J.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Liu, Chu, Thuerey et al., ConFIG: Towards Conflict-free Training of Physics "
        "Informed Neural Networks, arXiv:2408.11104, 2024"
    )
    # Not "non_conflicting": that holds when the gradients are linearly independent (the
    # paper's setting, Theorem 1), not in general: for dependent gradients U x = p can have no
    # solution and the pseudo-inverse's least-squares x can conflict (e.g. u, -u, u).
    properties: ClassVar[frozenset[str]] = frozenset(
        {"permutation_invariant", "positively_homogeneous", "aligned_direction"}
    )

    def __init__(
        self, num_tasks: int, *, pref_vector: Sequence[float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        pref = preference_vector(pref_vector, num_tasks, default=1.0, nonnegative=True)
        if not is_uniform(pref):
            self.properties = self.properties - {"permutation_invariant"}
        self.pref_vector = pref_vector
        self.register_buffer("pref", pref, persistent=False)

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        g = 0.5 * (g + g.T)
        k = g.shape[0]
        pref = self.pref.to("cpu", torch.float64).numpy()
        diag = np.diag(g)
        top = float(diag.max()) if k else 0.0
        active = diag > _ZERO_REL * top if top > 0 else np.zeros(k, dtype=bool)
        inv_norm = np.zeros(k)
        inv_norm[active] = 1.0 / np.sqrt(diag[active])
        cos = g * inv_norm[:, None] * inv_norm[None, :]
        eps = float(torch.finfo(gramian.dtype).eps)
        lam, vec = np.linalg.eigh(cos)
        keep = lam > float(lam.max(initial=0.0)) * 10 * k * eps
        coef = vec[:, keep].T @ pref
        b = inv_norm * ((vec[:, keep] / lam[keep]) @ coef)
        sq_norm = float(b @ g @ b)  # ||x||^2
        # U x is the projection of p onto the span of the unit gradients, of norm ||coef||.
        # When it is zero up to round-off (e.g. u, -u), x = 0 and so is d (the official code
        # would normalise the round-off of x into a spurious unit direction).
        if not sq_norm > 0 or float(np.linalg.norm(coef)) <= 100 * k * eps * float(
            np.linalg.norm(pref)
        ):
            w = np.zeros(k)
        else:
            w = (float(np.sum(g @ b)) / sq_norm) * b
        return torch.as_tensor(w, dtype=gramian.dtype, device=gramian.device)
