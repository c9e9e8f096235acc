"""Deep-AMTFL: asymmetric transfer from reliable tasks to the shared features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = ["DeepAMTFL"]


class DeepAMTFL(nn.Module):
    """Asymmetric task-to-feature transfer with loss-based weighting (Deep-AMTFL).

    Lee, Yang & Hwang, "Deep Asymmetric Multi-task Feature Learning", ICML 2018. With Z
    [N, d] the shared features of a batch, Y = Z W [N, K] the tasks' outputs and L_t the
    task losses, the paper minimises

        ``sum_t (1 + alpha ||a_t||_1) L_t + gamma ||Z - ReLU(Y A)||_F^2``

    where A [K, d] (this module's parameter) maps task outputs back to the features, row a_t
    being task t's outgoing transfer. The reconstruction lets tasks shape the shared
    features; weighting ``||a_t||_1`` by L_t makes unreliable (high-loss) tasks transfer
    less, hence asymmetric. :meth:`forward` returns the part beyond ``sum_t L_t``:

        ``alpha sum_t ||a_t||_1 L_t + gamma ||Z - ReLU(Y A)||_F^2``,

    the scalar the trainer adds. Its gradient reaches the network through L_t, Y and Z, and
    A (optimise this module's parameters with the network's).

    Args:
        num_tasks: K.
        num_features: d, the width of the shared features Z.
        alpha: strength of the loss-weighted l1 penalty on the transfer (tuned in the paper).
        gamma: strength of the feature reconstruction (tuned in the paper).
    The Frobenius norm sums over the batch, as in the paper; divide gamma by the batch size
    when the task losses are batch means.
    """

    def __init__(self, num_tasks: int, num_features: int, *, alpha: float, gamma: float) -> None:
        super().__init__()
        for name, v in (("num_tasks", num_tasks), ("num_features", num_features)):
            if not isinstance(v, int) or v < 1:
                raise InvalidHyperparameterError(f"{name}={v!r} must be a positive integer")
        for name, v in (("alpha", alpha), ("gamma", gamma)):
            if not v >= 0:
                raise InvalidHyperparameterError(f"{name}={v!r} must be >= 0")
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.transfer = nn.Parameter(torch.randn(num_tasks, num_features) * 0.01)

    def task_weights(self, detach: bool = True) -> Tensor:
        """The effective weight ``1 + alpha ||a_t||_1`` of each task's loss [K]."""
        w = 1 + self.alpha * self.transfer.abs().sum(dim=1)
        return w.detach() if detach else w

    def reconstruction(self, outputs: Tensor) -> Tensor:
        """``ReLU(Y A)`` [N, d], the features rebuilt from the task outputs Y [N, K]."""
        return F.relu(outputs @ self.transfer)

    def forward(self, losses: Tensor, outputs: Tensor, features: Tensor) -> Tensor:
        k, d = self.transfer.shape
        if losses.shape != (k,):
            raise PolytaskError(f"losses must be [{k}] task losses, got {tuple(losses.shape)}")
        if outputs.dim() != 2 or outputs.shape[1] != k:
            raise PolytaskError(
                f"outputs must be [batch, {k}] (one scalar output per task and sample), got "
                f"{tuple(outputs.shape)}"
            )
        if features.shape != (outputs.shape[0], d):
            raise PolytaskError(
                f"features must be [batch={outputs.shape[0]}, {d}], got {tuple(features.shape)}"
            )
        transfer = self.alpha * (self.transfer.abs().sum(dim=1) * losses).sum()
        residual = features - self.reconstruction(outputs)
        return transfer + self.gamma * residual.pow(2).sum()
