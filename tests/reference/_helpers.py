"""Helpers of the reference comparisons: seeded Jacobians, tolerances, the LibMTL host."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import polytask

from .._libmtl import register_libmtl

# ---------------------------------------------------------------------------------------
# generic helpers


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_jacobian(k: int, p: int, seed: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """A [K, P] Jacobian with rows of uneven norms and some conflicts (seeded)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=g, dtype=dtype)
    scales = torch.exp(torch.randn(k, 1, generator=g, dtype=dtype))
    return rows * scales


#: The shapes every comparison runs on: K tasks x P parameters.
SHAPES = [(k, p) for k in (2, 3, 10) for p in (5, 50)]
#: Seeds per shape; the last one only runs with --runslow (keeps the suite < 60 s).
SEEDS = (0, 1, 2)


def grid(keep: Any = None) -> list[Any]:
    """``pytest.param(k, p, seed)`` over SHAPES x SEEDS (optionally filtered by keep(k, p))."""
    out = []
    for k, p in SHAPES:
        if keep is not None and not keep(k, p):
            continue
        for s in SEEDS:
            marks = [pytest.mark.slow] if s == SEEDS[-1] else []
            out.append(pytest.param(k, p, s, id=f"K{k}-P{p}-s{s}", marks=marks))
    return out


def assert_rel_close(
    actual: Tensor, expected: Tensor, rtol: float, what: str = "", *, atol: float = 0.0
) -> None:
    """||actual - expected|| <= rtol * ||expected|| + atol (atol for aggregates near 0)."""
    actual = actual.detach().to(torch.float64).reshape(-1)
    expected = expected.detach().to(torch.float64).reshape(-1)
    err = float((actual - expected).norm())
    ref = float(expected.norm())
    assert err <= rtol * ref + atol, (
        f"{what}: error {err:.3e} > {rtol:.1e} * {ref:.3e} + {atol:.1e} "
        f"(relative {err / max(ref, 1e-300):.3e})\n"
        f"  polytask:  {actual[:6].tolist()}\n  reference: {expected[:6].tolist()}"
    )


def rel_err(actual: Tensor, expected: Tensor) -> float:
    actual = actual.detach().to(torch.float64).reshape(-1)
    expected = expected.detach().to(torch.float64).reshape(-1)
    return float((actual - expected).norm()) / max(float(expected.norm()), 1e-12)


def make_method(name: str, num_tasks: int, **hparams: Any) -> polytask.methods.Method:
    """``polytask.methods.create`` that skips the test while ``name`` is not registered."""
    if name not in polytask.methods.available():
        pytest.skip(f"polytask method {name!r} is not registered (yet)")
    return polytask.methods.create(name, num_tasks=num_tasks, **hparams)


def polytask_backward(
    method: polytask.methods.Method,
    jacobian: Tensor,
    loss_values: Sequence[float] | Tensor | None = None,
    **ctx: Any,
) -> tuple[Tensor, Any]:
    """Run ``method.backward`` on losses L_k = <J_k, x> + c_k at x = 0; return (x.grad, result).

    The Jacobian of these losses w.r.t. x is exactly ``jacobian`` and their values are c
    (default all ones), which is what the LibMTL host feeds its weightings too.
    """
    k, p = jacobian.shape
    c = (
        torch.ones(k, dtype=jacobian.dtype)
        if loss_values is None
        else torch.as_tensor(loss_values, dtype=jacobian.dtype)
    )
    x = torch.zeros(p, dtype=jacobian.dtype, requires_grad=True)
    losses = jacobian @ x + c
    result = method.backward(losses, shared_params=[x], **ctx)
    assert x.grad is not None
    return x.grad.detach().clone(), result


# ---------------------------------------------------------------------------------------
# LibMTL


def load_libmtl_weighting() -> types.ModuleType:
    """Import ``LibMTL.weighting`` without running ``LibMTL/__init__.py``."""
    if "LibMTL.weighting" in sys.modules:
        return sys.modules["LibMTL.weighting"]
    register_libmtl()
    return importlib.import_module("LibMTL.weighting")


class LibMTLHost:
    """Feed a known Jacobian to one LibMTL weighting and read back its update.

    ``run(J, loss_values)`` builds the losses L_k = <J_k, x> + c_k at x = 0 (so the task
    gradients are the rows of J and the loss values are c), calls the weighting's
    ``backward(losses, **kwargs)`` and returns ``(x.grad, returned weights)``. The host
    keeps the weighting instance, so stateful weightings (GradVac's rho_T, IMTL's and
    GradNorm's loss scales) carry their state from one ``run`` to the next.

    With ``rep_grad=True`` (GradDrop) the host exposes a representation ``rep`` (batch
    first) with value ``rep_value`` (default ones of shape [1, P]; any shape with P entries)
    and per-task copies ``rep_tasks``; then L_k = <J_k, rep_tasks[k]> + c_k (J_k read in
    rep's flattened order) and the update is read from ``x.grad``, rep = x + rep_value.
    """

    def __init__(
        self,
        weighting_cls: type,
        num_tasks: int,
        num_params: int,
        *,
        rep_grad: bool = False,
        rep_value: Tensor | None = None,
        kwargs: dict[str, Any] | None = None,
        **attrs: Any,
    ) -> None:
        self.num_tasks = num_tasks
        self.num_params = num_params
        self.kwargs = dict(kwargs or {})
        self.rep_grad = rep_grad
        self.rep_value = rep_value

        def zero_grad_share_params(host: nn.Module) -> None:
            # LibMTL calls encoder.zero_grad(), which sets .grad to None on torch >= 2
            # and then breaks its own _reset_grad; zero in place instead.
            host.encoder.zero_grad(set_to_none=False)

        def get_share_params(host: nn.Module) -> Iterator[nn.Parameter]:
            return host.encoder.parameters()

        host_cls = type(
            f"Host{weighting_cls.__name__}",
            (weighting_cls,),
            {
                "get_share_params": get_share_params,
                "zero_grad_share_params": zero_grad_share_params,
            },
        )
        with default_dtype(torch.float64):
            host = host_cls()
            host.task_num = num_tasks
            host.task_name = [f"task{k}" for k in range(num_tasks)]
            host.device = torch.device("cpu")
            host.rep_grad = rep_grad
            host.encoder = nn.Module()
            host.encoder.x = nn.Parameter(torch.zeros(num_params, dtype=torch.float64))
            host.epoch = 0
            for name, value in attrs.items():
                setattr(host, name, value)
            host.init_param()
        self.host = host

    @property
    def x(self) -> nn.Parameter:
        return self.host.encoder.x

    def run(
        self, jacobian: Tensor, loss_values: Sequence[float] | Tensor | None = None
    ) -> tuple[Tensor, Any]:
        k, p = jacobian.shape
        assert (k, p) == (self.num_tasks, self.num_params)
        jacobian = jacobian.to(torch.float64)
        c = (
            torch.ones(k, dtype=torch.float64)
            if loss_values is None
            else torch.as_tensor(loss_values, dtype=torch.float64)
        )
        host = self.host
        x = host.encoder.x
        x.grad = torch.zeros_like(x)
        with default_dtype(torch.float64):
            if self.rep_grad:
                value = (
                    torch.ones(1, p, dtype=torch.float64)
                    if self.rep_value is None
                    else self.rep_value.to(torch.float64)
                )
                assert value.numel() == p, "rep_value must have P entries"
                rep = x.reshape(value.shape) + value  # depends on x: rep.backward reaches x
                host.rep = rep
                host.rep_tasks = {}
                losses = []
                for t, task in enumerate(host.task_name):
                    rt = rep.detach().clone().requires_grad_(True)
                    host.rep_tasks[task] = rt
                    losses.append((rt.reshape(-1) * jacobian[t]).sum() + c[t])
                losses = torch.stack(losses)
            else:
                losses = jacobian @ x + c
            weights = host.backward(losses, **self.kwargs)
        assert x.grad is not None
        return x.grad.detach().clone(), weights


# ---------------------------------------------------------------------------------------
# enumerating the random task orders of PCGrad / GradVac in the references


@contextlib.contextmanager
def fixed_randperms(perms: Sequence[Sequence[int]]) -> Iterator[None]:
    """Make ``torch.randperm`` return ``perms`` in turn (torchjd's PCGrad / GradVac orders)."""
    queue = [torch.tensor(list(p), dtype=torch.long) for p in perms]
    original = torch.randperm

    def fake(n: int, *args: Any, **kwargs: Any) -> Tensor:
        perm = queue.pop(0)
        assert len(perm) == n, f"expected a permutation of {n}, got {perm.tolist()}"
        return perm

    torch.randperm = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.randperm = original  # type: ignore[assignment]
    assert not queue, "not every scripted permutation was used"


@contextlib.contextmanager
def fixed_shuffles(module: types.ModuleType, orders: Sequence[Sequence[int]]) -> Iterator[None]:
    """Make ``random.shuffle`` inside a LibMTL module put its list in the given orders.

    Each order lists the *values* the shuffled list must end up holding (LibMTL shuffles
    lists of task indices).
    """
    queue = [list(o) for o in orders]

    class _Random:
        @staticmethod
        def shuffle(seq: list[int]) -> None:
            order = queue.pop(0)
            assert sorted(order) == sorted(seq), f"order {order} is not a shuffle of {seq}"
            seq[:] = order

    original = module.random
    module.random = _Random  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.random = original  # type: ignore[attr-defined]
    assert not queue, "not every scripted order was used"


def orders_of_others(k: int) -> list[list[tuple[int, ...]]]:
    """Per task i, every order of the other K-1 tasks."""
    return [list(itertools.permutations([j for j in range(k) if j != i])) for i in range(k)]


def distinct_rows(rows: Sequence[Tensor], tol: float) -> list[Tensor]:
    """The rows of ``rows`` that differ by more than ``tol`` (relative) from earlier ones."""
    out: list[Tensor] = []
    for r in rows:
        if all(rel_err(r, o) > tol for o in out):
            out.append(r)
    return out


def min_rel_distance(x: Tensor, candidates: Sequence[Tensor]) -> float:
    return min(rel_err(x, c) for c in candidates)


def paired_conflicts(num_pairs: int, block: int, seed: int) -> Tensor:
    """[2 n, n block] Jacobian of n conflicting pairs living in disjoint coordinate blocks.

    Rows of different pairs are orthogonal (no conflict), so order-dependent methods
    (PCGrad, GradVac) give the same result for every task order: a deterministic K = 2n case.
    """
    g = torch.Generator().manual_seed(seed)
    jac = torch.zeros(2 * num_pairs, num_pairs * block, dtype=torch.float64)
    for i in range(num_pairs):
        a = torch.randn(block, generator=g, dtype=torch.float64)
        b = -a + 0.7 * torch.randn(block, generator=g, dtype=torch.float64)
        if float(a @ b) >= 0:  # make sure the pair conflicts
            b = b - (float(a @ b) / float(a @ a) + 0.3) * a
        jac[2 * i, i * block : (i + 1) * block] = a
        jac[2 * i + 1, i * block : (i + 1) * block] = b
    return jac


def assert_cagrad_optimal(jac: Tensor, c: float, lam: Tensor, ref: Tensor) -> None:
    """polytask's CAGrad (weights ``lam``, rescale=0) is optimal against a reference ``ref``.

    Primal: max_d f(d) = min_k <g_k, d> s.t. ||d - g0|| <= r = c ||g0||. Both answers must
    be feasible and polytask's at least as good. With the dual optimum w*, for any feasible
    d: f(d*) - f(d) >= <g_w*, d* - d> >= ||g_w*|| / (2 r) ||d - d*||^2 (a linear function
    over a ball), and lam = 1/K + (r / ||g_w*||) w* gives ||g_w*|| / r = 1 / (sum(lam) - 1).
    """
    ours = lam @ jac
    g0 = jac.mean(dim=0)
    r = c * float(g0.norm())
    scale = float(jac.norm(dim=1).max())
    assert float((ours - g0).norm()) <= r * (1 + 1e-9) + 1e-12 * scale, "infeasible"
    # A reference may overshoot the ball slightly (LibMTL adds 1e-8 to the radius): it can
    # then beat the optimum by at most excess * max_k ||g_k||.
    excess = max(0.0, float((ref - g0).norm()) - r)
    assert excess <= 1e-6 * r + 1e-12 * scale, "reference far outside the ball"
    slack = excess * scale + 1e-12 * scale**2
    f_ours, f_ref = float((jac @ ours).min()), float((jac @ ref).min())
    assert f_ours >= f_ref - slack, f"polytask's CAGrad is worse: {f_ours} < {f_ref}"
    t = float(lam.sum()) - 1.0
    dist2 = float((ref - ours) @ (ref - ours))
    assert dist2 <= 2 * t * (f_ours - f_ref + slack) + 1e-12 * scale**2, (
        f"reference outside the optimality ball: {dist2:.3e} > {2 * t * (f_ours - f_ref):.3e}"
    )


def polytask_features_backward(
    method: polytask.methods.Method,
    jacobian: Tensor,
    features_value: Tensor,
    loss_values: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Any]:
    """``backward(mode="features")`` on features = x + value, L_k = <J_k, features> + c_k."""
    k, p = jacobian.shape
    c = (
        torch.ones(k, dtype=jacobian.dtype)
        if loss_values is None
        else torch.as_tensor(loss_values, dtype=jacobian.dtype)
    )
    x = torch.zeros(p, dtype=jacobian.dtype, requires_grad=True)
    features = x.reshape(features_value.shape) + features_value
    losses = jacobian @ features.reshape(-1) + c
    result = method.backward(losses, shared_params=[x], features=features, mode="features")
    assert x.grad is not None
    return x.grad.detach().clone(), result
