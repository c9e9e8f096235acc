"""SRDML: similar tasks should have similar saliency (input-gradient) maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = ["SRDML", "saliency"]


def saliency(output: Tensor, features: Tensor) -> Tensor:
    """Each sample's channel saliency [N, C]: the gradient of its scalar output with respect
    to the features [N, C, *spatial], summed over the spatial positions, keeping the graph
    (the regulariser is differentiated again). The batch is summed before differentiating,
    so samples must not interact (no batch statistics between ``features`` and ``output``).
    """
    out = output.reshape(output.shape[0], -1) if output.dim() > 1 else output[:, None]
    if out.shape != (features.shape[0], 1):
        raise PolytaskError(
            f"each task output must be one scalar per sample ([N] or [N, 1]), got "
            f"{tuple(output.shape)}; reduce it first (e.g. take the target class's logit)"
        )
    (g,) = torch.autograd.grad(out.sum(), features, create_graph=True)
    return g.flatten(2).sum(-1) if g.dim() > 2 else g


class SRDML(nn.Module):
    """Saliency-regularised deep multi-task learning: pull related tasks' saliency together.

    Bai & Zhao, "Saliency-Regularized Deep Multi-Task Learning", KDD 2022 (official code
    BaiTheBest/SRDML). Each task t's saliency alpha_t(x) [C] is the gradient of its output
    with respect to the shared feature map, summed over positions (:func:`saliency`). With
    the learned task relation c_uv >= 0 (u < v) the regulariser is

        ``sum_x sum_{u<v} c_uv / (sum_{u'<v'} c_u'v') * ||alpha_u(x) - alpha_v(x)||_1``,

    summed over the batch as in the official code, which adds it with weight mu = 0.1 to the
    mean task losses. c (this module's parameter, initialised to 1) is trained by gradient
    descent on the same objective; call :meth:`project_` after each optimizer step to keep
    it non-negative, as the official code's ReLU.

    Args:
        num_tasks: K (at least 2).
        init: initial relation value (official 1).
    """

    def __init__(self, num_tasks: int, *, init: float = 1.0) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 2:
            raise InvalidHyperparameterError(f"num_tasks={num_tasks!r} must be an integer >= 2")
        if not init > 0:
            raise InvalidHyperparameterError(f"init={init} must be > 0")
        self.num_tasks = num_tasks
        self.relation = nn.Parameter(torch.full((num_tasks, num_tasks), float(init)))
        u, v = torch.triu_indices(num_tasks, num_tasks, offset=1)
        self.register_buffer("_pairs", torch.stack([u, v]), persistent=False)

    def pair_weights(self) -> Tensor:
        """c_uv / sum c over the pairs u < v, in ``triu_indices`` order."""
        c = self.relation[self._pairs[0], self._pairs[1]]
        total = c.sum()
        if not bool(total > 0):
            raise PolytaskError(
                "every task relation c_uv is 0; re-initialise SRDML (its relations must keep a "
                "positive sum)"
            )
        return c / total

    def distances(self, saliencies: Tensor) -> Tensor:
        """``sum_x ||alpha_u(x) - alpha_v(x)||_1`` for each pair u < v, from [K, N, C]."""
        a, b = saliencies[self._pairs[0]], saliencies[self._pairs[1]]
        return (a - b).abs().sum(dim=(1, 2))

    def forward(self, outputs: Sequence[Tensor] | Mapping[str, Tensor], features: Tensor) -> Tensor:
        outs = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
        if len(outs) != self.num_tasks:
            raise PolytaskError(f"got {len(outs)} task outputs for {self.num_tasks} tasks")
        if not features.requires_grad:
            raise PolytaskError(
                "features must require grad and be the shared representation the task outputs "
                "were computed from"
            )
        sal = torch.stack([saliency(o, features) for o in outs])
        return (self.pair_weights() * self.distances(sal)).sum()

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the relations to be non-negative (call after each optimizer step)."""
        self.relation.clamp_(min=0)
