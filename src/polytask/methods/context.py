"""The context keys a method may need beyond the losses, declared and typed in one place.

A method lists the keys it needs in ``Method.needs``; ``backward(losses, ..., **ctx)`` checks
that each is present and valid (type, shape, range) before the method sees it, and rejects
keys that no method defines, so a misspelt ``kpi=`` is an error rather than silently ignored.
Each key also carries an ``example`` value, which the shared test suite and the docs use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polytask.errors import InvalidContextError

__all__ = ["CONTEXT", "ContextKey", "check_context"]


@dataclass(frozen=True)
class ContextKey:
    """One context key: what it holds, how it is checked and an example for K tasks."""

    name: str
    description: str
    check: Callable[[Any, int], Any]
    example: Callable[[int], Any]


def _vector(name: str, value: Any, k: int, *, low: float | None = None, high: float | None = None):
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = torch.as_tensor(list(value), dtype=torch.float64)
    if not isinstance(value, Tensor):
        raise InvalidContextError(
            f"{name} must be a 1-D tensor of {k} numbers (one per task), got {type(value).__name__}"
        )
    if value.shape != (k,):
        raise InvalidContextError(
            f"{name} must have shape ({k},) (one entry per task), got {tuple(value.shape)}"
        )
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        raise InvalidContextError(f"{name}={value.tolist()} must be finite")
    if (low is not None and bool((value < low).any())) or (
        high is not None and bool((value > high).any())
    ):
        raise InvalidContextError(f"{name}={value.tolist()} must lie in [{low}, {high}]")
    return value


def _check_kpis(value: Any, k: int) -> Tensor:
    return _vector("kpis", value, k, low=0.0, high=1.0)


def _check_val_losses(value: Any, k: int) -> Tensor:
    return _vector("val_losses", value, k)


def _check_epoch(value: Any, k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidContextError(f"epoch={value!r} must be a non-negative integer (0-based)")
    return value


def _check_sample_losses(value: Any, k: int) -> list[Tensor]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != k:
        raise InvalidContextError(
            f"sample_losses must be a sequence of {k} 1-D tensors (each task's per-sample "
            f"losses, reduction='none'), got {type(value).__name__}"
            + (f" of length {len(value)}" if isinstance(value, Sequence) else "")
        )
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, Tensor) or v.dim() != 1:
            raise InvalidContextError(
                f"sample_losses[{i}] must be a 1-D tensor of per-sample losses, got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        if not bool(torch.isfinite(v.detach()).all()):
            raise InvalidContextError(f"sample_losses[{i}] (task {i}) holds non-finite losses")
        out.append(v)
    return out


def _check_present(value: Any, k: int) -> Tensor:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = torch.as_tensor(list(value))
    if not isinstance(value, Tensor) or value.dtype != torch.bool or value.shape != (k,):
        raise InvalidContextError(
            f"present must be a bool tensor of shape ({k},) marking the tasks that have a loss "
            f"in this step, got {getattr(value, 'dtype', type(value).__name__)} "
            f"{tuple(getattr(value, 'shape', ()))}"
        )
    if not bool(value.any()):
        raise InvalidContextError("present marks no task; a step needs at least one task's loss")
    return value


def _check_loss_scale(value: Any, k: int) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidContextError(f"loss_scale must be a number, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise InvalidContextError(f"loss_scale={value} must be positive and finite")
    return float(value)


def _check_num_samples(value: Any, k: int) -> float | Tensor:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = torch.as_tensor(list(value), dtype=torch.float64)
    if isinstance(value, Tensor) and value.dim() == 1:
        if value.shape != (k,):
            raise InvalidContextError(
                f"num_samples as a tensor must have one count per task, shape ({k},), got "
                f"{tuple(value.shape)}"
            )
        value = value.detach().to(torch.float64)
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise InvalidContextError(
                f"num_samples={value.tolist()} must be finite and non-negative (this rank's "
                "number of samples of each task)"
            )
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidContextError(f"num_samples must be a number, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise InvalidContextError(
            f"num_samples={value} must be positive and finite (this rank's number of samples)"
        )
    return float(value)


def _check_xi_jacobians(value: Any, k: int) -> Any:
    # SDMGrad checks the pair's shapes against the main Jacobian itself.
    if not isinstance(value, Sequence) or not all(isinstance(v, Tensor) for v in value):
        raise InvalidContextError(
            f"xi_jacobians must be a pair (J_xi, J_xi') of [K={k}, P] tensors, got "
            f"{type(value).__name__}"
        )
    return value


CONTEXT: dict[str, ContextKey] = {
    key.name: key
    for key in (
        ContextKey(
            "kpis",
            "Tensor[K] in [0, 1]: each task's key performance indicator (accuracy, mIoU, ...) "
            "on recent data, higher is better (DTP)",
            _check_kpis,
            lambda k: torch.linspace(0.2, 0.9, k),
        ),
        ContextKey(
            "val_losses",
            "Tensor[K]: each task's loss on the validation split at the latest evaluation",
            _check_val_losses,
            lambda k: torch.linspace(1.0, 2.0, k),
        ),
        ContextKey(
            "epoch",
            "int >= 0: the current epoch (0-based), for methods that update once per epoch",
            _check_epoch,
            lambda k: 0,
        ),
        ContextKey(
            "sample_losses",
            "list of K tensors [B_k]: each task's per-sample losses (reduction='none'), "
            "connected to the graph, for instance-weighting methods",
            _check_sample_losses,
            lambda k: None,  # built from the model by the test suites
        ),
        ContextKey(
            "present",
            "BoolTensor[K]: which tasks have a loss in this step (multi-input MTL, where a "
            "step may hold only some tasks); absent tasks' entries of `losses` are ignored",
            _check_present,
            lambda k: torch.ones(k, dtype=torch.bool),
        ),
        ContextKey(
            "loss_scale",
            "float > 0: `losses` were multiplied by this factor (fp16 loss scaling, e.g. "
            "torch.amp.GradScaler.get_scale()); the method balances the unscaled gradients and "
            "leaves loss_scale x the update in .grad, for scaler.unscale_/step/update",
            _check_loss_scale,
            lambda k: 1.0,
        ),
        ContextKey(
            "num_samples",
            "number > 0, or Tensor[K] >= 0 (one per task): how many samples this rank's "
            "losses average over; under polytask.distributed each rank's losses and gradients "
            "count in proportion to it (default: equal shares); ignored on one process",
            _check_num_samples,
            lambda k: 4,
        ),
        ContextKey(
            "xi_jacobians",
            "(Tensor[K, P], Tensor[K, P]): task Jacobians of two further mini-batches, for "
            "SDMGrad's double-sampling estimate of the Gramian",
            _check_xi_jacobians,
            lambda k: None,
        ),
    )
}


def check_context(ctx: Mapping[str, Any], needs: frozenset[str], k: int, owner: str) -> dict:
    """Validate ``ctx`` for a method that ``needs`` these keys; return the checked values."""
    from polytask.errors import MissingContextError

    unknown = sorted(set(ctx) - set(CONTEXT))
    if unknown:
        raise InvalidContextError(
            f"{owner}.backward got unknown context key(s) {unknown}; known keys: "
            f"{sorted(CONTEXT)} (see polytask.methods.context)"
        )
    missing = sorted(key for key in needs if ctx.get(key) is None)
    if missing:
        raise MissingContextError(
            f"{owner} needs {', '.join(missing)} passed to backward(...) as keyword "
            f"argument(s) ({'; '.join(CONTEXT[m].description for m in missing)}); it got "
            f"{sorted(ctx) or 'none'}"
        )
    return {key: CONTEXT[key].check(value, k) for key, value in ctx.items() if value is not None}
