"""Sequential Reptile: one inner trajectory across tasks, Reptile outer update (ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import BackwardResult
from polytask.methods.meta import (
    LossFn,
    MetaMethod,
    MetaStepResult,
    check_inner_step,
    check_task_losses,
    trainable_parameters,
)
from polytask.methods.registry import register


@register("sequential_reptile")
class SequentialReptile(MetaMethod):
    """Sequential Reptile: Reptile over one inner trajectory that visits the tasks in turn.

    :meth:`meta_step` *is* the training step: from phi = theta_0 it takes S inner SGD steps
    theta_s = theta_{s-1} - alpha grad L_{t_s}(theta_{s-1}; B_s), each on one task t_s drawn
    from Cat(task_probs) and its batch B_s, then the outer (Reptile) update
    phi <- phi - eta (phi - theta_S). Because the trajectory runs through every task
    sequentially, the update's second-order term rewards gradients that agree *across* tasks
    (inter-task gradient alignment), unlike Reptile run per task. Lee, Lee, Lee & Hwang,
    "Sequential Reptile: Inter-Task Gradient Alignment for Multilingual Learning", ICLR 2022
    (Algorithm 1).

    ``meta_step_replaces_step`` is true: loops call :meth:`meta_step` instead of the ordinary
    step. :meth:`backward` alone is **not** Sequential Reptile: it is equal weighting
    (sum_k L_k, weights all ones), the first-order term of the Reptile update (as eta alpha
    -> 0 the update is eta alpha sum_s grad L_{t_s}); it exists so the method can also run in
    loops that know nothing of meta steps, and says so in its result (``extras``).

    ``meta_step(model, train_batch, None, loss_fn, inner_lr=... | inner_optimizer=...,
    tasks=None)``: ``train_batch`` is the sequence of the S inner batches; step s minimises
    ``loss_fn(model, train_batch[s])[t_s]``. The tasks t_s are drawn from ``self.generator``
    (seeded by ``seed=``) unless given as ``tasks=[t_1, ..., t_S]`` (where each batch holds
    one task's data, as in the paper's multilingual setting, sample the tasks first and
    build the batches to match). With ``inner_optimizer`` (any torch optimizer over the
    model's parameters, e.g. the paper's AdamW) the inner steps are that optimizer's steps.

    We could not find official code; the algorithm follows the paper.

    Args:
        num_tasks: K.
        outer_lr: eta in (0, 1]; default 0.1 (as we read the paper's setting).
        task_probs: the task distribution of the inner steps [K], non-negative, normalised
            here; default uniform (the paper samples tasks in proportion to their data).
    Needs: :meth:`meta_step` with S inner batches; no validation batch.
    Returns weights: ones (backward); the meta step reports the tasks it visited.
    """

    paper: ClassVar[str] = (
        "Lee, Lee, Lee & Hwang, Sequential Reptile: Inter-Task Gradient Alignment for "
        "Multilingual Learning, ICLR 2022"
    )
    stochastic: ClassVar[bool] = True
    meta_step_replaces_step: ClassVar[bool] = True
    meta_step_distributed: ClassVar[bool] = True

    def __init__(
        self,
        num_tasks: int,
        *,
        outer_lr: float = 0.1,
        task_probs: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if (
            isinstance(outer_lr, bool)
            or not isinstance(outer_lr, (int, float))
            or not math.isfinite(outer_lr)
            or not 0 < outer_lr <= 1
        ):
            raise InvalidHyperparameterError(f"outer_lr={outer_lr!r} must lie in (0, 1]")
        self.outer_lr = float(outer_lr)
        if task_probs is None:
            probs = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        else:
            try:
                probs = torch.as_tensor(list(task_probs), dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                probs = None  # not a sequence of numbers: the error below names it
            if probs is None or probs.shape != (num_tasks,):
                raise InvalidHyperparameterError(
                    f"task_probs={task_probs!r} must hold {num_tasks} probabilities, one per "
                    f"task (num_tasks={num_tasks})"
                )
            if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or probs.sum() <= 0:
                raise InvalidHyperparameterError(
                    f"task_probs={probs.tolist()} must be finite, non-negative, not all zero"
                )
            probs = probs / probs.sum()
        self.task_probs = None if task_probs is None else tuple(float(p) for p in task_probs)
        self.register_buffer("probs", probs)

    def task_weights(self) -> Tensor:
        return torch.ones(self.num_tasks)

    def backward(self, losses: Tensor, **kwargs: Any) -> BackwardResult:  # type: ignore[override]
        result = super().backward(losses, **kwargs)
        result.extras["note"] = (
            "equal weighting; Sequential Reptile's update is meta_step (meta_step_replaces_step)"
        )
        return result

    def meta_step(  # type: ignore[override]
        self,
        model: nn.Module,
        train_batch: Sequence[Any],
        val_batch: Any,
        loss_fn: LossFn,
        *,
        inner_lr: float | None = None,
        inner_optimizer: torch.optim.Optimizer | None = None,
        tasks: Sequence[int] | None = None,
        num_samples: Sequence[float] | None = None,
    ) -> MetaStepResult:
        """S sequential inner steps, then phi <- phi - outer_lr (phi - theta_S), in place.

        Under :func:`polytask.distributed.distribute` each inner batch is this rank's share
        (``num_samples``: its sizes, one per inner batch; default equal shares) and each
        inner gradient is the count-weighted mean over the ranks, so every rank follows the
        trajectory of the whole batches. ``extras["inner_losses"]`` are this rank's."""
        owner = type(self).__name__
        check_inner_step(inner_lr, inner_optimizer, sgd_only=False)
        if val_batch is not None:
            raise ValueError(f"{owner}.meta_step uses no validation batch; pass val_batch=None")
        if not callable(loss_fn):
            raise TypeError(f"{owner}.meta_step needs loss_fn(model, batch) -> Tensor[K]")
        if isinstance(train_batch, (str, bytes)) or not isinstance(train_batch, Sequence):
            raise TypeError(
                f"{owner}.meta_step needs train_batch as a sequence of the inner steps' batches "
                f"(one per inner step), got {type(train_batch).__name__}"
            )
        steps = len(train_batch)
        if steps == 0:
            raise ValueError(f"{owner}.meta_step got no inner batch (train_batch is empty)")
        order = self._tasks(tasks, steps)
        if num_samples is not None and len(num_samples) != steps:
            raise ValueError(
                f"num_samples has {len(num_samples)} entries but train_batch has {steps} inner "
                "batches; give this rank's sample count of each"
            )
        _, params = trainable_parameters(model, owner)
        phi = [p.detach().clone() for p in params]
        inner_losses = []
        for s, (batch, task) in enumerate(zip(train_batch, order.tolist())):
            what = f"train_batch[{s}]"
            loss = check_task_losses(loss_fn(model, batch), self.num_tasks, what)[task]
            inner_losses.append(float(loss.detach()))
            if self.sync is not None:
                self._distributed_inner_step(
                    loss,
                    params,
                    None if num_samples is None else num_samples[s],
                    inner_lr,
                    inner_optimizer,
                )
            elif inner_optimizer is not None:
                inner_optimizer.zero_grad()
                loss.backward()
                inner_optimizer.step()
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(inner_lr * g)
        if inner_optimizer is not None:
            inner_optimizer.zero_grad()
        with torch.no_grad():
            shift = torch.cat([(p0 - p).reshape(-1) for p0, p in zip(phi, params)])
            for p0, p in zip(phi, params):
                # phi - eta (phi - theta_S) = phi + eta (theta_S - phi).
                p.copy_(p0 + self.outer_lr * (p - p0))
        return MetaStepResult(
            weights=None,
            extras={
                "tasks": order,
                "inner_losses": torch.tensor(inner_losses),
                "reptile_direction_norm": float(shift.norm()),
            },
        )

    def _distributed_inner_step(
        self,
        loss: Tensor,
        params: list[Tensor],
        count: float | None,
        inner_lr: float | None,
        inner_optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """One inner step on the global batch: the count-weighted mean of the ranks' gradients
        (``.grad`` stays ``None`` where no rank's batch reached a parameter, as in one process)."""
        from polytask.distributed.backward import reduce_backward

        assert self.sync is not None
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        reduce_backward(self.sync, loss, count)
        if inner_optimizer is not None:
            inner_optimizer.step()
        else:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(inner_lr * p.grad)
        for p, g in zip(params, saved):
            p.grad = g

    def _tasks(self, tasks: Sequence[int] | None, steps: int) -> Tensor:
        if tasks is None:
            # The generator lives on the CPU; a buffer moved to a GPU cannot be drawn from it.
            probs = self.probs.cpu()
            return torch.multinomial(probs, steps, replacement=True, generator=self.generator)
        if isinstance(tasks, Tensor):
            tasks = tasks.tolist()
        tasks = list(tasks)
        if len(tasks) != steps:
            raise ValueError(
                f"tasks has {len(tasks)} entries but train_batch has {steps} inner batches; "
                "give one task index per inner batch"
            )
        for t in tasks:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_tasks:
                raise ValueError(
                    f"tasks={tasks}: {t!r} is not a task index in [0, {self.num_tasks - 1}]"
                )
        return torch.tensor(tasks, dtype=torch.long)
