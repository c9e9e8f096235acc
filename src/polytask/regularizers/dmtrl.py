"""DMTRL: per-task layer weights generated from shared tensor factors (LAF, Tucker, TT)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.archs.base import check_tasks
from polytask.errors import InvalidHyperparameterError, PolytaskError
from polytask.regularizers._tensor import mode_product, stack_tasks, unfold

__all__ = ["DMTRLLinear", "TensorFactorisedWeights"]

METHODS = ("laf", "tucker", "tt")


def _ranks(rank: int | Sequence[int], maxima: Sequence[int], what: str) -> list[int]:
    """One rank per factor: an int is clipped to each factor's maximum, a list is checked."""
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise InvalidHyperparameterError(f"rank={rank} must be a positive integer")
        return [min(rank, m) for m in maxima]
    ranks = list(rank)
    if len(ranks) != len(maxima) or any(not 1 <= r <= m for r, m in zip(ranks, maxima)):
        raise InvalidHyperparameterError(
            f"rank={ranks} must give {len(maxima)} {what} ranks, each between 1 and {list(maxima)}"
        )
    return ranks


def _tt_ranks(rank: int | Sequence[int], full: Sequence[int]) -> list[int]:
    """TT ranks r_1 .. r_{N-1}, each at most min(r_{i-1} D_i, D_{i+1} ... D_N) so that the
    sequential SVDs of TT-SVD can produce them."""
    ranks, left = [], 1
    given = None if isinstance(rank, int) and not isinstance(rank, bool) else list(rank)
    if given is None and rank < 1:
        raise InvalidHyperparameterError(f"rank={rank} must be a positive integer")
    if given is not None and len(given) != len(full) - 1:
        raise InvalidHyperparameterError(f"rank={given} must give {len(full) - 1} TT ranks")
    for i in range(len(full) - 1):
        bound = min(left * full[i], math.prod(full[i + 1 :]))
        r = min(rank, bound) if given is None else given[i]
        if not 1 <= r <= bound:
            raise InvalidHyperparameterError(
                f"TT rank {r} at position {i} of rank={given} must be between 1 and {bound}"
            )
        ranks.append(r)
        left = r
    return ranks


def _top_singular(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


class TensorFactorisedWeights(nn.Module):
    """Each task's weight tensor generated from factors shared by all tasks and a small
    per-task factor: Yang & Hospedales, "Deep Multi-task Representation Learning: A Tensor
    Factorisation Approach", ICLR 2017.

    The stack W [*shape, K] of the K tasks' weights is never stored; it is factorised as

    - ``"laf"`` (last axis flattening): ``W_(N)^T = L S``, i.e. ``W_t = reshape(L s_t)``
      with L [prod(shape), r] shared and s_t [r] task t's;
    - ``"tucker"``: ``W = C x_1 U_1 ... x_{N-1} U_{N-1} x_N U_N``, with the core C and the
      factors U_i [D_i, r_i] shared and the row u_t [r_N] of the task factor U_N task t's;
    - ``"tt"`` (tensor train): ``W[d_1, ..., d_{N-1}, t] = G_1[d_1] G_2[:, d_2] ... g_t``,
      with the cores G_i shared and the last core's column g_t [r_{N-1}] task t's.

    The paper initialises the factors by decomposing single-task models' weights
    (:meth:`from_weights`, as the official code: SVD, HOSVD, TT-SVD); a fresh module starts
    from random factors (the task factors of unit expected norm, the scale in the shared ones).

    Args:
        shape: shape of one task's weight tensor.
        tasks: task names or K.
        method: ``"laf"``, ``"tucker"`` (default) or ``"tt"``.
        rank: an int (clipped per factor to its largest useful value) or one rank per factor
            (LAF: 1; Tucker: N = len(shape) + 1, the last the task factor's; TT: N - 1).
    """

    def __init__(
        self,
        shape: Sequence[int],
        tasks: Sequence[str] | int,
        *,
        method: str = "tucker",
        rank: int | Sequence[int] = 4,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        if not self.shape or any(d < 1 for d in self.shape):
            raise InvalidHyperparameterError(f"shape={tuple(shape)} must be positive sizes")
        if method not in METHODS:
            raise InvalidHyperparameterError(f"method={method!r}; choose one of {METHODS}")
        self.tasks = check_tasks(tasks)
        self.method = method
        k, dims = len(self.tasks), self.shape
        scale = 1.0 / math.sqrt(dims[0])
        if method == "laf":
            (r,) = _ranks(rank, [min(math.prod(dims), k)], "LAF")
            self.ranks = (r,)
            self.basis = nn.Parameter(torch.randn(math.prod(dims), r) * scale / math.sqrt(r))
            task_dim = r
        elif method == "tucker":
            self.ranks = tuple(_ranks(rank, [*dims, k], "Tucker"))
            self.factors = nn.ParameterList(
                nn.Parameter(torch.linalg.qr(torch.randn(d, r))[0])
                for d, r in zip(dims, self.ranks)
            )
            self.core = nn.Parameter(torch.randn(*self.ranks) * scale)
            task_dim = self.ranks[-1]
        else:
            self.ranks = tuple(_tt_ranks(rank, [*dims, k]))
            edges = (1, *self.ranks)
            self.cores = nn.ParameterList(
                nn.Parameter(torch.randn(edges[i], d, edges[i + 1]) / math.sqrt(edges[i]))
                for i, d in enumerate(dims)
            )
            task_dim = self.ranks[-1]
        # Unit-norm task factors: the scale of the weights lives in the shared factors.
        self.task_factors = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(task_dim) / math.sqrt(task_dim)) for t in self.tasks}
        )

    @classmethod
    def from_weights(
        cls,
        weights: Tensor | Sequence[Tensor],
        tasks: Sequence[str] | int | None = None,
        *,
        method: str = "tucker",
        rank: int | Sequence[int] = 4,
    ) -> TensorFactorisedWeights:
        """Factors of given per-task weights (e.g. trained single-task models), truncated to
        ``rank``: the paper's initialisation. At full rank the weights are reproduced."""
        w = stack_tasks(weights).detach()
        names = tasks if tasks is not None else w.shape[-1]
        module = cls(w.shape[:-1], names, method=method, rank=rank)
        if len(module.tasks) != w.shape[-1]:
            raise PolytaskError(f"{w.shape[-1]} task weights for tasks {list(module.tasks)}")
        module.to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            module._decompose(w)
        return module

    def _decompose(self, w: Tensor) -> None:
        n = w.dim()
        if self.method == "laf":
            u, s, vh = _top_singular(unfold(w, [n - 1]).T, self.ranks[0])
            self.basis.copy_(u)
            task_cols = s[:, None] * vh
        elif self.method == "tucker":
            us = [_top_singular(unfold(w, [i]), r)[0] for i, r in zip(range(n), self.ranks)]
            core = w
            for i, u in enumerate(us):
                core = mode_product(core, u.T, i)
            self.core.copy_(core)
            for p, u in zip(self.factors, us[:-1]):
                p.copy_(u)
            task_cols = us[-1].T
        else:
            rest, left = w, 1
            for i, core in enumerate(self.cores):
                mat = rest.reshape(left * w.shape[i], -1)
                u, s, vh = _top_singular(mat, self.ranks[i])
                core.copy_(u.reshape(left, w.shape[i], -1))
                rest, left = s[:, None] * vh, self.ranks[i]
            task_cols = rest
        for j, t in enumerate(self.tasks):
            self.task_factors[t].copy_(task_cols[:, j])

    def weight(self, task: str) -> Tensor:
        """Task ``task``'s weight tensor of shape :attr:`shape`."""
        if task not in self.task_factors:
            raise PolytaskError(f"unknown task {task!r}; the tasks are {list(self.tasks)}")
        v = self.task_factors[task]
        if self.method == "laf":
            return (self.basis @ v).view(self.shape)
        if self.method == "tucker":
            w = torch.tensordot(self.core, v, dims=([-1], [0]))
            for i, u in enumerate(self.factors):
                w = mode_product(w, u, i)
            return w
        w = self.cores[0].squeeze(0)
        for core in self.cores[1:]:
            w = torch.tensordot(w, core, dims=([-1], [0]))
        return w @ v

    def stacked(self) -> Tensor:
        """All tasks' weights [*shape, K] (tasks last)."""
        return torch.stack([self.weight(t) for t in self.tasks], dim=-1)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.task_factors:
            raise PolytaskError(f"unknown task {task!r}; the tasks are {list(self.tasks)}")
        yield self.task_factors[task]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        owned = {id(p) for p in self.task_factors.values()}
        yield from (p for p in self.parameters() if id(p) not in owned)


class DMTRLLinear(nn.Module):
    """A linear layer with one weight per task, tensor-factorised across tasks (DMTRL).

    ``y = [x, 1] W_t`` where W_t [in_features + 1, out_features] (its last row is the bias,
    factorised with the weights) comes from :class:`TensorFactorisedWeights`. Use it for the
    task-specific layers of a network (the paper factorises every layer of K single-task
    networks); ``weights.task_parameters(t)`` are task t's own parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tasks: Sequence[str] | int,
        *,
        method: str = "tucker",
        rank: int | Sequence[int] = 4,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weights = TensorFactorisedWeights(
            (in_features + 1, out_features), tasks, method=method, rank=rank
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.weights.tasks

    def forward(self, x: Tensor, task: str) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise PolytaskError(
                f"DMTRLLinear expects {self.in_features} input features, got {tuple(x.shape)}"
            )
        w = self.weights.weight(task)
        return F.linear(x, w[:-1].T, w[-1])
