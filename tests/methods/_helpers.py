"""Shared fixtures of the method test suites: tiny multi-task models, method factories and the
checks of ``Method.backward`` against independently computed gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import polytask
from polytask.methods.context import CONTEXT


def method_ctx(method: polytask.methods.Method, k: int) -> dict[str, Any]:
    """The declared example value of every context key ``method`` needs."""
    ctx = {key: CONTEXT[key].example(k) for key in method.needs}
    missing = [key for key, value in ctx.items() if value is None]
    assert not missing, f"the shared suites cannot build {missing} for {type(method).__name__}"
    return ctx


def make(name: str, k: int, **kw: Any) -> polytask.methods.Method:
    cls = polytask.methods.get(name)
    if cls.stochastic and "seed" not in kw:
        kw["seed"] = 0
    return polytask.methods.create(name, k, **kw)


@dataclass
class TinyProblem:
    encoder: nn.Module
    heads: nn.ModuleList
    x: torch.Tensor
    ys: list[torch.Tensor]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(self.x)
        losses = torch.stack([((h(features) - y) ** 2).mean() for h, y in zip(self.heads, self.ys)])
        return losses, features

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def parameters(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def grads(self) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.parameters()]

    def shared(self) -> list[torch.Tensor]:
        return list(self.encoder.parameters())

    def shared_grad(self) -> torch.Tensor:
        """The encoder's ``.grad``, flattened into one vector [P]."""
        return torch.cat([p.grad.reshape(-1) for p in self.shared()])

    def task_jacobian(self, mode: str = "params") -> torch.Tensor:
        """Independent K x P Jacobian by plain autograd, one fresh forward per task: w.r.t. the
        encoder (``mode="params"``) or the features (``mode="features"``)."""
        rows = []
        for k in range(len(self.heads)):
            losses, features = self.forward()
            inputs = self.shared() if mode == "params" else [features]
            grads = torch.autograd.grad(losses[k], inputs)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)

    def pull_back(self, direction: torch.Tensor, mode: str) -> torch.Tensor:
        """The encoder gradient a ``mode`` direction stands for: itself in params mode, its
        chain rule through the features (d features / d encoder)^T direction in features mode."""
        if mode == "params":
            return direction
        _, features = self.forward()
        grads = torch.autograd.grad(features, self.shared(), direction.view_as(features))
        return torch.cat([g.reshape(-1) for g in grads])

    def head_task_grads(self) -> list[tuple[torch.Tensor, ...]]:
        """Each head's gradient of its own task's loss alone."""
        out = []
        for i, head in enumerate(self.heads):
            losses, _ = self.forward()
            out.append(torch.autograd.grad(losses[i], list(head.parameters())))
        return out

    def backward(self, method: polytask.methods.Method, mode: str | None = None) -> Any:
        """One fresh forward, then ``method.backward`` on the encoder: given a ``mode``, with
        ``features`` and that mode; without one, the plain call (params mode, no features)."""
        losses, features = self.forward()
        if mode is None:
            return method.backward(losses, shared_params=self.shared())
        return method.backward(losses, shared_params=self.shared(), features=features, mode=mode)


def tiny_problem(k: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyProblem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(k)]).to(dtype)
    x = torch.randn(12, 6, generator=gen, dtype=dtype)
    ys = [torch.randn(12, 1, generator=gen, dtype=dtype) * (i + 1) for i in range(k)]
    return TinyProblem(encoder, heads, x, ys)


def random_jacobian(k: int, p: int, *, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=gen, dtype=dtype)


def linear_problem(
    k: int, *, seed: int = 0, batch: int = 8, conflicting: bool = False
) -> TinyProblem:
    """A smaller float64 model: a ``Linear(5, 4)`` encoder and ``Linear(4, 1)`` heads.

    With ``conflicting`` the targets alternate in sign around a common one, so the tasks'
    gradients conflict; otherwise target k is noise scaled by k + 1.
    """
    torch.manual_seed(seed)
    encoder = nn.Linear(5, 4).double()
    heads = nn.ModuleList([nn.Linear(4, 1).double() for _ in range(k)])
    x = torch.randn(batch, 5, dtype=torch.float64)
    if conflicting:
        y = 3.0 * torch.randn(batch, 1, dtype=torch.float64)
        ys = [y * (-1) ** i + 0.5 * torch.randn(batch, 1, dtype=torch.float64) for i in range(k)]
    else:
        ys = [torch.randn(batch, 1, dtype=torch.float64) * (i + 1) for i in range(k)]
    return TinyProblem(encoder, heads, x, ys)


def assert_backward(
    problem: TinyProblem,
    method: polytask.methods.Method,
    mode: str,
    direction: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    check_heads: bool = True,
    head_scales: Sequence[float] | None = None,
    head_rtol: float | None = None,
    head_atol: float | None = None,
) -> Any:
    """Run ``method.backward`` on ``problem`` and check the gradients it writes.

    The encoder must get ``direction`` (given in ``mode``'s space, pulled back through the
    features in features mode) within ``rtol``/``atol``. With ``check_heads``, head k must get
    its own task's gradient times ``head_scales[k]`` (unscaled when ``None``), within
    ``head_rtol``/``head_atol`` (``torch.testing`` defaults when ``None``). Returns the
    backward result for further checks.
    """
    expected = problem.pull_back(direction, mode)
    head_grads = problem.head_task_grads() if check_heads else []
    result = problem.backward(method, mode)
    torch.testing.assert_close(problem.shared_grad(), expected, rtol=rtol, atol=atol)
    if check_heads:
        scales = [None] * len(head_grads) if head_scales is None else list(head_scales)
        for scale, head, grads in zip(scales, problem.heads, head_grads, strict=True):
            for p, g in zip(head.parameters(), grads, strict=True):
                want = g if scale is None else scale * g
                torch.testing.assert_close(p.grad, want, rtol=head_rtol, atol=head_atol)
    return result


def assert_weighted_shared_grad(
    problem: TinyProblem, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the encoder's ``.grad`` is ``weights @ J`` (J: the params-mode task Jacobian,
    computed independently); returns ``(J, the flattened encoder gradient)``."""
    jac = problem.task_jacobian()
    d = problem.shared_grad()
    torch.testing.assert_close(d, weights @ jac)
    return jac, d


def epoch_step(method: polytask.methods.Method, values: Sequence[float], epoch: int):
    """One ``backward`` of constant task losses ``values`` at ``epoch``; the weights."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    losses = torch.tensor(values, dtype=torch.float64) + 0.0 * p
    return method.backward(losses, shared_params=[p], epoch=epoch).weights
