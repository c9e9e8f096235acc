"""The linear unit that mixes K task columns: cross-stitch units and sluice alpha units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["StitchUnit", "imbalanced_matrix"]


def imbalanced_matrix(num_tasks: int, subspaces: int, own: float, other: float) -> Tensor:
    """The [K*M, K*M] initial mixing matrix: subspace m of task t reads subspace m of every
    task, ``own`` from its own task and ``other`` from each other task (no cross-subspace
    mixing at the start)."""
    tasks = torch.full((num_tasks, num_tasks), float(other))
    tasks.fill_diagonal_(float(own))
    return torch.kron(tasks, torch.eye(subspaces))


class StitchUnit(nn.Module):
    """Linear mixing of the K columns' features, split into M channel subspaces each.

    ``x̃_{t,m} = Σ_{s,n} α[(t,m),(s,n)] · x_{s,n}``, where ``x_{s,n}`` is the n-th of M equal
    channel chunks of column s's features. α is a scalar per pair, or a vector over the
    chunk's channels (``channels`` given: channel-wise). The rows of α that produce task t's
    features are task t's own parameter ``rows[t]`` of shape [M, K*M] (or [M, K*M, C/M]), so
    a model can tell which rows only reach one task.

    Args:
        tasks: the K task names (column order).
        subspaces: M, the number of channel chunks per column.
        init: the initial [K*M, K*M] matrix.
        channels: the columns' channel count C for a channel-wise α; ``None`` for scalars.
    """

    def __init__(
        self, tasks: Sequence[str], subspaces: int, init: Tensor, channels: int | None = None
    ) -> None:
        super().__init__()
        k, m = len(tasks), subspaces
        if init.shape != (k * m, k * m):
            raise ValueError(f"init must be [{k * m}, {k * m}], got {tuple(init.shape)}")
        if channels is not None and channels % m:
            raise ValueError(f"channels={channels} is not divisible into {m} subspaces")
        self.tasks = tuple(tasks)
        self.subspaces = m
        self.channels = channels
        rows = {}
        for i, t in enumerate(self.tasks):
            block = init[i * m : (i + 1) * m].clone().to(torch.get_default_dtype())
            if channels is not None:
                block = block.unsqueeze(-1).repeat(1, 1, channels // m)
            rows[t] = nn.Parameter(block)
        self.rows = nn.ParameterDict(rows)

    def matrix(self) -> Tensor:
        """The full α ([K*M, K*M], or [K*M, K*M, C/M] channel-wise)."""
        return torch.cat([self.rows[t] for t in self.tasks], dim=0)

    def forward(
        self, features: Mapping[str, Tensor], targets: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Mixed features of ``targets`` (default: every task) from every column's features."""
        m = self.subspaces
        chunks = []
        for s in self.tasks:
            x = features[s]
            if x.shape[1] % m:
                raise ValueError(
                    f"task {s!r}'s features have {x.shape[1]} channels, not divisible into "
                    f"{m} subspaces"
                )
            if self.channels is not None and x.shape[1] != self.channels:
                raise ValueError(
                    f"task {s!r}'s features have {x.shape[1]} channels but this unit was built "
                    f"for {self.channels}; fix `channels`"
                )
            chunks.extend(x.chunk(m, dim=1))
        stacked = torch.stack(chunks)  # [K*M, B, C/M, ...]
        out = {}
        for t in self.tasks if targets is None else targets:
            alpha = self.rows[t]
            if self.channels is None:
                mixed = torch.einsum("mj,jb...->mb...", alpha, stacked)
            else:
                shape = alpha.shape + (1,) * (stacked.dim() - 3)
                mixed = (alpha.reshape(shape).unsqueeze(2) * stacked.unsqueeze(0)).sum(1)
            out[t] = torch.cat(list(mixed), dim=1)
        return out
