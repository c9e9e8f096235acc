"""MRN: a tensor normal prior on the stacked task-specific weights, with its covariances
re-estimated by the flip-flop algorithm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError, PolytaskError
from polytask.regularizers._tensor import mode_product, stack_tasks, unfold

__all__ = ["MRN"]


class MRN(nn.Module):
    """Multilinear relationship network prior on the task-specific layers' weights.

    Long, Cao, Wang & Yu, "Learning Multiple Tasks with Multilinear Relationship Networks",
    NeurIPS 2017. The K tasks' weights of a task-specific layer, stacked as W [D_1, ..., D_N]
    (tasks last; for a linear layer D_1 = input features, D_2 = outputs, D_3 = K), get a
    tensor normal prior ``vec(W) ~ N(0, Sigma_1 (x) ... (x) Sigma_N)``. Its negative log
    density, up to the log-determinant terms that do not depend on W, is

        ``forward(W) = vec(W)^T (Sigma_1^-1 (x) ... (x) Sigma_N^-1) vec(W)
                     = <W, W x_1 Sigma_1^-1 ... x_N Sigma_N^-1>``,

    the scalar the trainer adds (times lambda / 2) to the task losses. Between gradient steps
    :meth:`update` re-estimates the covariances by the flip-flop algorithm (paper eq. 9), for
    each learned mode n in turn:

        ``Sigma_n = W_(n) (kron_{m != n} Sigma_m)^-1 W_(n)^T / prod_{m != n} D_m + eps I``.

    The covariances (buffers, so they are checkpointed) start at the identity.

    Args:
        shape: (D_1, ..., D_N) of the stacked weights, the last the number of tasks.
        learn: the modes whose covariance is learned (default all, as the paper; the
            official code learns only the task covariance, ``learn=(-1,)``).
        eps: the ridge ``eps I`` added to each estimate for stability (official: 1e-5).
    """

    def __init__(
        self, shape: Sequence[int], *, learn: Sequence[int] | None = None, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) < 2 or any(d < 1 for d in self.shape):
            raise InvalidHyperparameterError(
                f"shape={tuple(shape)} must be the positive sizes of at least 2 axes (tasks last)"
            )
        n = len(self.shape)
        modes = list(range(n)) if learn is None else list(learn)
        normalised = [m % n for m in modes if isinstance(m, int) and -n <= m < n]
        if len(normalised) != len(modes) or len(set(normalised)) != len(modes):
            raise InvalidHyperparameterError(
                f"learn={modes} must be distinct axes of a {n}-axis tensor (negative allowed)"
            )
        self.learn = tuple(sorted(normalised))
        if not eps >= 0:
            raise InvalidHyperparameterError(f"eps={eps} must be >= 0")
        self.eps = eps
        for i, d in enumerate(self.shape):
            self.register_buffer(f"cov{i}", torch.eye(d))

    def covariances(self) -> list[Tensor]:
        return [getattr(self, f"cov{i}") for i in range(len(self.shape))]

    def _check(self, weights: Tensor | Sequence[Tensor]) -> Tensor:
        w = stack_tasks(weights)
        if tuple(w.shape) != self.shape:
            raise PolytaskError(
                f"MRN was built for stacked weights of shape {self.shape}, got {tuple(w.shape)}"
            )
        return w

    def _whiten(self, w: Tensor, skip: int | None = None) -> Tensor:
        """``w x_m Sigma_m^-1`` over every mode m except ``skip``."""
        for m, cov in enumerate(self.covariances()):
            if m != skip:
                cov = cov.to(w)
                w = mode_product(w, torch.linalg.solve(cov, torch.eye(len(cov)).to(w)), m)
        return w

    def forward(self, weights: Tensor | Sequence[Tensor]) -> Tensor:
        w = self._check(weights)
        return (w * self._whiten(w)).sum()

    @torch.no_grad()
    def update(self, weights: Tensor | Sequence[Tensor], sweeps: int = 1) -> None:
        """``sweeps`` flip-flop sweeps over the learned modes on the current weights."""
        w = self._check(weights).detach()
        for _ in range(sweeps):
            for n in self.learn:
                cov = getattr(self, f"cov{n}")
                rows = unfold(w, [n])
                others = unfold(self._whiten(w, skip=n), [n])
                est = rows @ others.T / (w.numel() // w.shape[n])
                est = (est + est.T) / 2 + self.eps * torch.eye(len(est)).to(est)
                cov.copy_(est.to(cov))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, learn={self.learn}, eps={self.eps}"
