"""Base classes of every balancing method and the shared input checks.

Three families (``Method.family``):

* ``"loss"``: a function of the losses only; one ordinary backward pass of a combined
  objective (EW, UW, DWA, FAMO, ...).
* ``"gramian"``: weights are a function of the Gramian G = J J^T only, and the update is
  ``weights @ J`` (MGDA, CAGrad, Nash-MTL, UPGrad, ...). These expose
  :meth:`GramianMethod.weights_from_gramian`.
* ``"jacobian"``: need the Jacobian itself (PCGrad, GradDrop, GradVac, ...).

Gradient methods share one :meth:`GradientMethod.backward`: the Jacobian of the losses
w.r.t. the shared parameters (``mode="params"``) or w.r.t. the shared representation
(``mode="features"``, MGDA-UB's trick: one backward of the combined feature gradient
through the encoder) is aggregated into one direction written into ``.grad``;
task-specific parameters get their own task's gradient, times the method's weight where
it defines one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from polytask.autograd import JacobianEngine, accumulate_grads, gramian, leaves_reached
from polytask.distributed.sync import require_decision, task_counts
from polytask.errors import (
    EmptyParametersError,
    InvalidContextError,
    InvalidHyperparameterError,
    InvalidLossesError,
    NonFiniteError,
)
from polytask.methods.context import check_context

if TYPE_CHECKING:
    from polytask.distributed.sync import DistributedSync

Family = Literal["loss", "gramian", "jacobian"]
Mode = Literal["params", "features"]

#: Properties a method may claim; the shared property suite checks exactly the claimed ones.
PROPERTIES = frozenset(
    {
        # <d, g_k> >= 0 for every task k.
        "non_conflicting",
        # Permuting the tasks (rows of J) does not change the update.
        "permutation_invariant",
        # aggregate(a J) == a aggregate(J) for every a > 0.
        "positively_homogeneous",
        # aggregate(a J) == aggregate(J) for every a > 0.
        "scale_invariant",
        # With identical task gradients g, the update is g (up to a positive factor: see
        # ``"aligned_direction"``).
        "aligned_identity",
        # With identical task gradients g, the update is a positive multiple of g.
        "aligned_direction",
    }
)

__all__ = [
    "PROPERTIES",
    "AggregationResult",
    "BackwardResult",
    "GradientMethod",
    "GramianMethod",
    "LossMethod",
    "Method",
    "check_losses",
    "check_shared_params",
]


@dataclass
class BackwardResult:
    """What :meth:`Method.backward` returns.

    Attributes:
        weights: effective task weights [K] (detached), or ``None`` where the method's
            update is not a fixed weighting of the task gradients (PCGrad, GradDrop, ...).
        gramian: the K x K Gramian the method used, when it computed one.
        extras: method-specific diagnostics (solver iterations, cosines, ...).
        head_weights: the factors applied to each task's gradient on its task-specific
            parameters, where the paper prescribes other factors than ``weights`` (IMTL-G
            updates heads with their raw gradients); ``None`` means ``weights`` (or ones).
    """

    weights: Tensor | None
    gramian: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    head_weights: Tensor | None = None


@dataclass
class AggregationResult:
    """A gradient method's combined direction [P] and its task weights [K] if defined.

    ``head_weights`` overrides ``weights`` for the task-specific parameters (see
    :class:`BackwardResult`).
    """

    direction: Tensor
    weights: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    head_weights: Tensor | None = None


def check_losses(losses: Any, num_tasks: int) -> Tensor:
    """Validate ``losses`` as a 1-D tensor of ``num_tasks`` finite losses."""
    if not isinstance(losses, Tensor):
        raise InvalidLossesError(
            f"losses must be a 1-D torch.Tensor of {num_tasks} task losses, got "
            f"{type(losses).__name__}; build it with torch.stack([loss_1, ..., loss_K])"
        )
    if losses.dim() != 1:
        raise InvalidLossesError(
            f"losses must be 1-D with {num_tasks} entries, got shape {tuple(losses.shape)}; "
            "reduce each task's loss to a scalar and torch.stack them"
        )
    if losses.shape[0] != num_tasks:
        raise InvalidLossesError(
            f"losses has {losses.shape[0]} entries but the method was created with "
            f"num_tasks={num_tasks}"
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [(i, float(v)) for i, v in enumerate(losses.detach().tolist()) if not finite[i]]
        raise NonFiniteError(
            "non-finite task loss: "
            + ", ".join(f"task {i} = {v}" for i, v in bad)
            + "; check the inputs, labels and learning rate of these tasks"
        )
    if not losses.requires_grad:
        raise InvalidLossesError(
            "losses does not require grad: compute it from the model's output without "
            "torch.no_grad() or .detach()"
        )
    return losses


def check_shared_params(shared_params: Any) -> list[Tensor]:
    """Materialise ``shared_params``; keep those that require grad (frozen ones are left alone)."""
    if isinstance(shared_params, Tensor):
        shared_params = [shared_params]
    if shared_params is None:
        raise EmptyParametersError(
            "shared_params is None; pass the shared encoder's parameters, e.g. "
            "shared_params=list(model.encoder.parameters())"
        )
    params = list(shared_params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise EmptyParametersError(f"shared_params[{i}] is a {type(p).__name__}, not a tensor")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise EmptyParametersError(
            f"shared_params holds {len(params)} tensors and none requires grad; pass the "
            "shared encoder's trainable parameters, e.g. list(model.encoder.parameters())"
        )
    seen: set[int] = set()
    unique = []
    for p in trainable:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _check_finite_rows(matrix: Tensor, what: str) -> None:
    # Fast path: a row holding a NaN or an infinity has a non-finite sum, so finite row sums
    # prove every entry finite in one pass; a non-finite sum (maybe an overflow of finite
    # entries) falls through to the exact, slower check.
    if bool(torch.isfinite(matrix.sum(dim=1)).all()):
        return
    finite = torch.isfinite(matrix).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise NonFiniteError(
            f"non-finite {what} for task(s) {bad}; the losses were finite, so look for an "
            "overflow in the backward pass (mixed precision without loss scaling, log of 0, ...)"
        )


#: Hyper-parameters that may hold one value per task; a partial step keeps the present ones.
_PER_TASK_HPARAMS = ("weights", "pref_vector", "leak")
#: How each context key is restricted to the present tasks of a partial step.
_PER_TASK_CONTEXT = {
    "kpis": lambda v, i: v[i.to(v.device)],
    "val_losses": lambda v, i: v[i.to(v.device)],
    "sample_losses": lambda v, i: [v[j] for j in i.tolist()],
    "xi_jacobians": lambda v, i: tuple(j[i.to(j.device)] for j in v),
}
_TASK_FREE_CONTEXT = frozenset({"epoch", "loss_scale", "num_samples"})


def _select_tasks(key: str, value: Any, index: Tensor) -> Any:
    if key in _TASK_FREE_CONTEXT:
        return value
    if key not in _PER_TASK_CONTEXT:
        raise NotImplementedError(
            f"context key {key!r} has no rule for steps with only some tasks; add it to "
            "_PER_TASK_CONTEXT or _TASK_FREE_CONTEXT in polytask/methods/base.py"
        )
    return _PER_TASK_CONTEXT[key](value, index)


def _scatter(values: Tensor, index: Tensor, k: int) -> Tensor:
    """``values`` [m] of the tasks ``index`` as a [K] tensor, 0 for the other tasks."""
    out = torch.zeros(k, dtype=values.dtype, device=values.device)
    return out.index_copy(0, index.to(values.device), values.detach())


def _scattered(result: BackwardResult, index: Tensor, k: int) -> BackwardResult:
    """A sub-problem's result on the tasks ``index`` as a K-task result (0 elsewhere)."""
    return BackwardResult(
        weights=None if result.weights is None else _scatter(result.weights, index, k),
        gramian=result.gramian,
        extras=result.extras,
        head_weights=(
            None if result.head_weights is None else _scatter(result.head_weights, index, k)
        ),
    )


def _check_present_losses(losses: Any, index: Tensor, num_tasks: int) -> None:
    # The usual shape checks; finiteness only for present tasks, named by their own index.
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != num_tasks:
        check_losses(losses, num_tasks)
    values = losses.detach()[index.to(losses.device)]
    bad = [(int(i), float(v)) for i, v in zip(index, values) if not bool(torch.isfinite(v))]
    if bad:
        raise NonFiniteError(
            "non-finite task loss: "
            + ", ".join(f"task {i} = {v}" for i, v in bad)
            + "; check the inputs, labels and learning rate of these tasks"
        )


class Method(nn.Module):
    """A multi-task balancing method: turns K task losses into one descent update.

    Subclasses set the class metadata below and implement their family's hook.

    Args:
        num_tasks: K, the number of tasks.
    """

    #: registry name, set by :func:`polytask.methods.register`.
    name: ClassVar[str] = ""
    family: ClassVar[Family]
    #: Authors, title, venue and year of the paper the method implements.
    paper: ClassVar[str] = ""
    #: Keys of ``**ctx`` that :meth:`backward` requires.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Paper properties the shared test suite checks (a subset of :data:`PROPERTIES`).
    properties: ClassVar[frozenset[str]] = frozenset()
    #: Whether the method draws random numbers (seeded by ``seed=``).
    stochastic: ClassVar[bool] = False
    #: Smallest K the method is defined for.
    min_tasks: ClassVar[int] = 1
    #: Whether ``backward`` accepts ``present=`` marking only some tasks (multi-input MTL);
    #: such a step is the method's step on the present tasks alone (see :meth:`_partial_step`).
    #: Set it only where that is sound: stateless methods get it from a fresh sub-problem
    #: instance, stateful ones must override :meth:`_partial_backward` to update only the
    #: present tasks' state.
    partial_tasks: ClassVar[bool] = False
    #: The ``mode`` values :meth:`backward` supports.
    modes: ClassVar[frozenset[str]] = frozenset({"params", "features"})
    #: Whether :func:`polytask.distributed.distribute` can make the method balance the global
    #: batch of several ranks; if not, ``not_distributable_because`` says why.
    distributable: ClassVar[bool] = True
    not_distributable_because: ClassVar[str] = ""

    def __init__(self, num_tasks: int, *, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise InvalidHyperparameterError(f"num_tasks={num_tasks!r} must be a positive integer")
        if num_tasks < self.min_tasks:
            raise InvalidHyperparameterError(
                f"{type(self).__name__} needs at least {self.min_tasks} tasks, got "
                f"num_tasks={num_tasks}"
            )
        self.num_tasks = num_tasks
        self.seed = seed
        #: Set by :func:`polytask.distributed.distribute` (balance the global batch) and
        #: :func:`polytask.distributed.local` (balance each rank's batch on purpose).
        self.sync: DistributedSync | None = None
        self.rank_local = False
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        elif self.stochastic:
            self.generator.seed()

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments this instance was built with."""
        out = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name in ("self", "num_tasks", "args", "kwargs"):
                continue
            if hasattr(self, name):
                out[name] = getattr(self, name)
        return out

    def extra_repr(self) -> str:
        items = [f"num_tasks={self.num_tasks}"]
        items += [f"{k}={v!r}" for k, v in self.hparams().items()]
        return ", ".join(items)

    def _validate(
        self,
        losses: Any,
        shared_params: Any,
        mode: str,
        features: Tensor | None,
        ctx: dict[str, Any],
    ) -> tuple[Tensor, list[Tensor]]:
        """The checks every ``backward`` starts with; returns (losses, trainable shared)."""
        require_decision(self)
        losses = check_losses(losses, self.num_tasks)
        shared = check_shared_params(shared_params)
        _check_mode(self, mode, features)
        self._check_ctx(ctx)
        present = ctx.get("present")
        if present is not None and not bool(present.all()):
            # Partial steps are routed to _partial_step before validation; reaching here means
            # a backward that would silently treat absent tasks as present.
            raise NotImplementedError(
                f"{type(self).__name__} sets partial_tasks=True but its backward does not route "
                "partial steps through _partial_step; please report this as a bug"
            )
        return losses, shared

    def _check_ctx(self, ctx: dict[str, Any]) -> None:
        # Checked in place: the method body sees validated tensors (detached, right shape).
        ctx.update(check_context(ctx, self.needs, self.num_tasks, type(self).__name__))
        present = ctx.get("present")
        # Under polytask.distributed the step holds the tasks of every rank's batch, known
        # after a reduction (see _distributed_partial_step).
        local_only = self.sync is None
        if (
            present is not None
            and not bool(present.all())
            and not self.partial_tasks
            and local_only
        ):
            raise InvalidContextError(
                f"{type(self).__name__} does not support steps with only some tasks "
                f"(present={present.tolist()}); use a method with partial_tasks=True "
                "(polytask.methods.available() lists them in docs/methods.md) or sample "
                "every task in each step"
            )

    def why_not_distributable(self) -> str | None:
        """Why :func:`polytask.distributed.distribute` cannot take this instance (its class or
        its hyper-parameters), or ``None``."""
        if type(self).needs_meta_step and not getattr(type(self), "meta_step_distributed", False):
            return (
                "its meta step (an inner trajectory over per-task batches) is not distributed "
                "yet; train it on one process"
            )
        if not type(self).distributable:
            return type(self).not_distributable_because
        return None

    # -- steps with only some tasks (multi-input MTL) -------------------------------------
    def _partial_step(
        self,
        losses: Any,
        shared_params: Any,
        features: Tensor | None,
        mode: str,
        ctx: dict[str, Any],
    ) -> BackwardResult | None:
        """Run a step whose ``present`` marks only some tasks; ``None`` when all are present.

        The step is the method's own step on the sub-problem of the present tasks (their
        losses, per-task context and per-task hyper-parameters): absent tasks get weight 0 and
        no gradient, and their entries of ``losses`` are never read. Diagnostics in the result
        (``gramian``, ``extras``) describe that sub-problem; ``extras["tasks"]`` holds the
        indices of its tasks.
        """
        if ctx.get("present") is None:
            return None
        self._check_ctx(ctx)
        if self.sync is not None:
            return self._distributed_partial_step(losses, shared_params, features, mode, ctx)
        present = ctx["present"].to("cpu")
        if bool(present.all()):
            return None
        require_decision(self)
        ctx.pop("num_samples", None)
        index = present.nonzero().flatten()
        _check_present_losses(losses, index, self.num_tasks)
        if len(index) < self.min_tasks:
            raise InvalidContextError(
                f"{type(self).__name__} needs at least {self.min_tasks} tasks per step, but "
                f"present={present.tolist()} marks {len(index)}"
            )
        sub_ctx = {
            key: _select_tasks(key, value, index) for key, value in ctx.items() if key != "present"
        }
        result = self._partial_backward(
            losses, index, shared_params=shared_params, features=features, mode=mode, ctx=sub_ctx
        )
        result.extras["tasks"] = index
        return result

    def _distributed_partial_step(
        self,
        losses: Any,
        shared_params: Any,
        features: Tensor | None,
        mode: str,
        ctx: dict[str, Any],
    ) -> BackwardResult:
        """A step with ``present=`` under :func:`polytask.distributed.distribute`: the ranks'
        batches may hold different tasks. The step is the method's step on the tasks present
        on some rank, each task's losses and gradients counted over the ranks that hold it
        (a rank's count of a task it lacks is 0, and its entry of ``losses`` is not read);
        all ranks agree on the tasks after one all-reduce of K counts. Every rank must pass
        ``present`` on such a step (the Trainer always does under a process group)."""
        assert self.sync is not None
        present = ctx.pop("present")
        k = self.num_tasks
        if not isinstance(losses, Tensor) or losses.shape != (k,):
            check_losses(losses, k)  # raises, naming the problem
        device = losses.device
        counts = task_counts(ctx.pop("num_samples", None), k, device) * present.to(device)
        totals = self.sync.comm.all_reduce(counts.clone())
        index = (totals > 0).nonzero().flatten().cpu()
        local = present.cpu()
        _check_present_losses(losses, local.nonzero().flatten(), k)
        if len(index) < self.min_tasks:
            raise InvalidContextError(
                f"{type(self).__name__} needs at least {self.min_tasks} tasks per step, but the "
                f"ranks' batches hold {len(index)} (tasks {index.tolist()})"
            )
        zero = losses.detach().new_zeros(())
        # A task this rank lacks enters with count 0: a constant, never differentiated.
        stacked = torch.stack([losses[i] if bool(local[i]) else zero for i in index.tolist()])
        sub_ctx = {key: _select_tasks(key, value, index) for key, value in ctx.items()}
        sub_ctx["num_samples"] = counts[index.to(device)]
        if len(index) == k:
            return self.backward(
                stacked, shared_params=shared_params, features=features, mode=mode, **sub_ctx
            )
        if not self.partial_tasks:
            raise InvalidContextError(
                f"{type(self).__name__} does not support steps with only some tasks (the "
                f"ranks' batches hold tasks {index.tolist()} of {k}); use a method with "
                "partial_tasks=True or sample every task in each step"
            )
        sub = self._subproblem(index)
        result = sub.backward(
            stacked, shared_params=shared_params, features=features, mode=mode, **sub_ctx
        )
        result = _scattered(result, index, k)
        result.extras["tasks"] = index
        if isinstance(result.extras.get("global_losses"), Tensor):
            # K entries, 0 for the tasks no rank holds (a loop's placeholder losses).
            result.extras["global_losses"] = _scatter(result.extras["global_losses"], index, k)
        return result

    def _partial_backward(
        self,
        losses: Tensor,
        index: Tensor,
        *,
        shared_params: Any,
        features: Tensor | None,
        mode: str,
        ctx: dict[str, Any],
    ) -> BackwardResult:
        """The step on the present tasks ``index``, with ``ctx`` already reduced to them.

        The default runs a fresh instance built by :meth:`_subproblem`, which is right only for
        a method without state carried between steps; a stateful method that sets
        ``partial_tasks = True`` overrides this (or :meth:`LossMethod._partial_objective`)
        to update only the present tasks' state.
        """
        sub = self._subproblem(index)
        result = sub.backward(
            losses[index.to(losses.device)],
            shared_params=shared_params,
            features=features,
            mode=mode,
            **ctx,
        )
        return _scattered(result, index, self.num_tasks)

    def _subproblem(self, index: Tensor) -> Method:
        """This method on the tasks ``index`` only: same class and hyper-parameters (per-task
        ones restricted to ``index``), drawing from this method's generator so that seeded runs
        stay reproducible, on this method's device."""
        owner = type(self).__name__
        if any(True for _ in self.parameters()):
            # A fresh instance would silently drop learned state.
            raise NotImplementedError(
                f"{owner} has learnable parameters, so a partial step cannot run a fresh "
                "instance; override _partial_backward (or LossMethod._partial_objective)"
            )
        hparams = self.hparams()
        for name, value in hparams.items():
            if (
                isinstance(value, (Sequence, Tensor))
                and not isinstance(value, str)
                and len(value) == self.num_tasks
            ):
                if name not in _PER_TASK_HPARAMS:
                    raise NotImplementedError(
                        f"{owner}'s hyper-parameter {name}={value!r} may hold one value per "
                        "task; add it to _PER_TASK_HPARAMS in polytask/methods/base.py so "
                        "partial steps restrict it to the present tasks"
                    )
                hparams[name] = [value[i] for i in index.tolist()]
        hparams["seed"] = 0
        sub = type(self)(len(index), **hparams)
        sub.generator = self.generator
        sub.rank_local = self.rank_local
        sub.sync = self.sync
        if isinstance(self, GradientMethod):
            sub.engine = self.engine  # type: ignore[attr-defined]
        buffer = next(self.buffers(), None)
        return sub if buffer is None else sub.to(buffer.device)

    # -- hooks for the training loop ------------------------------------------------------
    #: Whether :meth:`after_step` needs the losses recomputed after the optimizer step.
    needs_losses_after_step: ClassVar[bool] = False
    #: Whether the method has a bi-level meta step that loops call through
    #: ``method.meta_step(...)`` (:class:`polytask.methods.meta.MetaMethod`).
    needs_meta_step: ClassVar[bool] = False
    #: Whether each task's head reads its own view of the shared representation, made by
    #: :meth:`task_views` (RotoGrad's rotations); loops in features mode must feed the heads
    #: these views, in training and in evaluation alike.
    has_task_views: ClassVar[bool] = False

    def task_views(self, features: Tensor) -> list[Tensor]:
        """The K views of the shared representation ``features`` that the task heads read,
        for methods with :attr:`has_task_views`."""
        raise NotImplementedError(
            f"{type(self).__name__} gives every task head the shared representation itself "
            "(has_task_views is False); decode the features directly"
        )

    def after_step(self, losses: Tensor, *, num_samples: float | None = None) -> None:
        """Called after ``optimizer.step()`` with the losses of the same batch, recomputed
        under ``torch.no_grad()``, by loops that see ``needs_losses_after_step`` (FAMO's
        update uses the loss decrease of the step). A no-op for most methods.

        Under :func:`polytask.distributed.distribute` the method sees the count-weighted
        mean of every rank's losses (``num_samples``: this rank's number of samples)."""
        if self.sync is not None and isinstance(losses, Tensor) and losses.dim() == 1:
            losses = self.sync.mean_losses(losses, num_samples)
        self._after_step(losses)

    def _after_step(self, losses: Tensor) -> None:
        """The method's update after the optimizer step (see :meth:`after_step`)."""

    def backward(  # type: ignore[override]
        self,
        losses: Tensor,
        *,
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        mode: Mode = "params",
        **ctx: Any,
    ) -> BackwardResult:
        """Leave the balanced descent direction in ``.grad`` of the parameters.

        Args:
            losses: 1-D tensor of the K task losses.
            shared_params: parameters shared by all tasks.
            features: the shared representation (needed for ``mode="features"``).
            mode: ``"params"`` balances the Jacobian w.r.t. ``shared_params``;
                ``"features"`` balances the Jacobian w.r.t. ``features``.
            **ctx: what the method declares in :attr:`needs`.
        """
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} is not called; use .backward(losses, shared_params=...)"
        )


class LossMethod(Method):
    """A method that maps the losses to one scalar objective (one backward pass)."""

    family: ClassVar[Family] = "loss"
    #: Whether the task-specific parameters (those ``losses`` reach outside
    #: ``shared_params``) take their task's unweighted gradient, the objective's gradient
    #: going to the shared parameters only (TaskCurriculum; ``head_weights`` are then ones).
    unweighted_heads: ClassVar[bool] = False

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        """Return (scalar objective to backpropagate, effective weights [K])."""
        raise NotImplementedError

    def backward(  # type: ignore[override]
        self,
        losses: Tensor,
        *,
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        mode: Mode = "params",
        **ctx: Any,
    ) -> BackwardResult:
        partial = self._partial_step(losses, shared_params, features, mode, ctx)
        if partial is not None:
            return partial
        losses, shared = self._validate(losses, shared_params, mode, features, ctx)
        if self.sync is not None:
            from polytask.distributed.backward import loss_backward

            result = loss_backward(
                self, losses, ctx, shared=shared if self.unweighted_heads else None
            )
        else:
            ctx.pop("num_samples", None)
            scale = ctx.pop("loss_scale", None)
            # The objective sees the true losses; its gradient flows scaled through the network.
            total, weights = self.objective(losses if scale is None else losses / scale, **ctx)
            total = total if scale is None else total * scale
            if self.unweighted_heads:
                task_leaves = leaves_reached([losses], exclude=shared)
                total.backward(inputs=shared, retain_graph=bool(task_leaves))
                if task_leaves:
                    # The losses carry the scale already.
                    losses.sum().backward(inputs=task_leaves)
            else:
                total.backward()
            result = BackwardResult(weights=weights.detach())
        if self.unweighted_heads:
            result.head_weights = torch.ones_like(result.weights)
        return result

    def _partial_backward(
        self,
        losses: Tensor,
        index: Tensor,
        *,
        shared_params: Any,
        features: Tensor | None,
        mode: str,
        ctx: dict[str, Any],
    ) -> BackwardResult:
        check_losses(losses[index.to(losses.device)], len(index))
        check_shared_params(shared_params)
        _check_mode(self, mode, features)
        scale = ctx.pop("loss_scale", None)
        total, weights = self._partial_objective(
            losses if scale is None else losses / scale, index, **ctx
        )
        if scale is not None:
            total = total * scale
        absent = torch.ones(self.num_tasks, dtype=torch.bool)
        absent[index] = False
        if weights.shape != (self.num_tasks,) or bool(weights.detach().cpu()[absent].ne(0).any()):
            raise RuntimeError(
                f"{type(self).__name__}._partial_objective returned weights {weights.tolist()} "
                f"that are not 0 for the absent tasks {absent.nonzero().flatten().tolist()}; "
                "please report this as a bug"
            )
        total.backward()
        return BackwardResult(weights=weights.detach())

    def _partial_objective(
        self, losses: Tensor, index: Tensor, **ctx: Any
    ) -> tuple[Tensor, Tensor]:
        """(objective, weights [K]) of a step on the present tasks ``index`` only.

        ``losses`` holds all K entries (the absent ones must not be read) and ``ctx`` is
        reduced to the present tasks. The default is :meth:`objective` of a fresh instance on
        the present tasks, right for stateless methods; a stateful method that sets
        ``partial_tasks = True`` overrides it to update only the present tasks' state, and
        returns weight 0 for the absent tasks.
        """
        sub = self._subproblem(index)
        sub._check_ctx(ctx)
        total, weights = sub.objective(losses[index.to(losses.device)], **ctx)
        return total, _scatter(weights, index, self.num_tasks)


def _skip_step(shared: list[Tensor], mode: str, features: Tensor | None) -> BackwardResult:
    """The scaled gradients overflowed: leave NaN in the shared gradients so that the
    GradScaler skips this optimizer step and lowers its scale (its usual overflow path)."""
    if mode == "params":
        for p in shared:
            nan = torch.full_like(p, float("nan"))
            p.grad = nan if p.grad is None else p.grad.add_(nan)
    else:
        assert features is not None
        features.backward(torch.full_like(features, float("nan")))
    return BackwardResult(weights=None, extras={"found_inf": True})


@contextlib.contextmanager
def own_grads_scaled(method: Method, scale: float | None) -> Iterator[None]:
    """Multiply by ``scale`` the gradients the method writes into its own parameters inside
    the block (IMTL's scales, GradNorm's weights, RotoGrad's rotations): with fp16 loss
    scaling every gradient in the optimizer is scaled, and ``GradScaler.unscale_`` divides
    them all by the scale. Earlier gradients are set aside meanwhile, so the new ones are
    scaled exactly."""
    if scale is None:
        yield
        return
    earlier = {}
    for p in method.parameters():
        earlier[id(p)] = p.grad
        p.grad = None
    try:
        yield
    finally:
        for p in method.parameters():  # also those the method created in the block
            old, new = earlier.get(id(p)), p.grad
            if new is not None:
                new = new * scale
            p.grad = old if new is None else (new if old is None else old + new)


def _check_mode(method: Method, mode: str, features: Tensor | None) -> None:
    if mode not in ("params", "features"):
        raise ValueError(f"mode={mode!r} must be 'params' or 'features'")
    if mode not in method.modes:
        hint = (
            " with features=<the shared representation the heads read>"
            if method.modes == {"features"}
            else ""
        )
        raise ValueError(
            f"{type(method).__name__} does not support mode={mode!r}; call "
            f"backward(..., mode={sorted(method.modes)[0]!r}){hint}"
        )
    if mode == "features":
        if features is None:
            raise ValueError(
                "mode='features' needs features=<the shared representation tensor> "
                "(the encoder's output that every task head reads)"
            )
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError(
                "features must be a tensor that requires grad (the encoder's output, not detached)"
            )


class GradientMethod(Method):
    """A method that combines the task gradients (rows of the Jacobian).

    Args:
        num_tasks: K.
        jacobian_strategy: how the engine computes J: ``"auto"``, ``"loop"``, ``"batched"``.
        max_chunk: at most this many tasks per batched reverse pass.
    """

    family: ClassVar[Family] = "jacobian"

    def __init__(
        self,
        num_tasks: int,
        *,
        seed: int | None = None,
        jacobian_strategy: str = "auto",
        max_chunk: int | None = None,
    ) -> None:
        super().__init__(num_tasks, seed=seed)
        self.engine = JacobianEngine(jacobian_strategy, max_chunk)  # type: ignore[arg-type]

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.pop("jacobian_strategy", None)
        out.pop("max_chunk", None)
        return out

    def aggregate(self, jacobian: Tensor) -> Tensor:
        """The combined update direction [P] of the task gradients ``jacobian`` [K, P]."""
        jacobian = self._check_jacobian(jacobian)
        return self._aggregate(jacobian).direction

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        """Combine the rows of ``jacobian``.

        ``backward`` passes ``losses`` (detached), ``param_sizes`` (the numel of each shared
        parameter, in column order: per-layer methods split J by it; in features mode a
        single block), ``mode``, ``features`` (the representation in features mode, else
        ``None``) and the user's ``**ctx``; :meth:`aggregate` passes none of them.
        """
        raise NotImplementedError

    def _check_jacobian(self, jacobian: Tensor) -> Tensor:
        if not isinstance(jacobian, Tensor) or jacobian.dim() != 2:
            raise ValueError(
                f"jacobian must be a 2-D tensor [K, P], got "
                f"{tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian)}"
            )
        if jacobian.shape[0] != self.num_tasks:
            raise ValueError(
                f"jacobian has {jacobian.shape[0]} rows but the method was created with "
                f"num_tasks={self.num_tasks}"
            )
        _check_finite_rows(jacobian, "gradient")
        return jacobian

    def backward(  # type: ignore[override]
        self,
        losses: Tensor,
        *,
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        mode: Mode = "params",
        **ctx: Any,
    ) -> BackwardResult:
        partial = self._partial_step(losses, shared_params, features, mode, ctx)
        if partial is not None:
            return partial
        losses, shared = self._validate(losses, shared_params, mode, features, ctx)
        if self.sync is not None:
            from polytask.distributed.backward import gradient_backward

            return gradient_backward(self, losses, shared, features, mode, ctx)
        ctx.pop("num_samples", None)
        scale = ctx.pop("loss_scale", None)
        if mode == "params":
            task_leaves = leaves_reached([losses], exclude=shared)
            jac = self.engine(losses, shared)
        else:
            assert features is not None
            task_leaves = leaves_reached([losses], stop_at=[features])
            jac = self.engine(losses, [features])
        if scale is not None:
            if not bool(torch.isfinite(jac).all()):
                return _skip_step(shared, mode, features)
            jac = jac / scale
        _check_finite_rows(jac, "gradient")
        sizes = tuple(p.numel() for p in shared) if mode == "params" else (jac.shape[1],)
        true_losses = losses.detach() if scale is None else losses.detach() / scale
        with own_grads_scaled(self, scale):
            result = self._aggregate(
                jac, losses=true_losses, param_sizes=sizes, mode=mode, features=features, **ctx
            )
        direction = result.direction
        if not bool(torch.isfinite(direction).all()):
            raise NonFiniteError(
                f"{type(self).__name__} produced a non-finite update from finite gradients "
                f"(gradient norms {jac.norm(dim=1).tolist()}); please report this as a bug"
            )
        weights = result.weights
        head_weights = result.head_weights
        if head_weights is None:
            head_weights = weights if weights is not None else torch.ones_like(losses)
        if task_leaves:
            torch.autograd.backward(
                losses,
                grad_tensors=head_weights.detach().to(losses),
                inputs=task_leaves,
                retain_graph=mode == "features",
            )
        # With loss scaling the heads already get scale x their gradient (the losses are
        # scaled); the shared update is scaled back up to match, GradScaler's convention.
        if scale is not None:
            direction = direction * scale
        if mode == "params":
            accumulate_grads(shared, direction)
        else:
            assert features is not None
            features.backward(direction.view_as(features).to(features.dtype))
        extras = dict(result.extras)
        g = extras.get("gramian")
        extras["jacobian_norms"] = (
            g.diagonal().clamp_min(0).sqrt() if isinstance(g, Tensor) else jac.norm(dim=1)
        ).detach()
        return BackwardResult(
            weights=None if weights is None else weights.detach(),
            gramian=extras.pop("gramian", None),
            extras=extras,
            head_weights=None if result.head_weights is None else head_weights.detach(),
        )


class GramianMethod(GradientMethod):
    """A gradient method whose weights depend on the Gramian G = J J^T only."""

    family: ClassVar[Family] = "gramian"

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Task weights [K] such that ``aggregate(J) == weights_from_gramian(J @ J.T) @ J``."""
        gramian = self._check_gramian(gramian)
        return self._weights(gramian)

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        raise NotImplementedError

    def _check_gramian(self, g: Tensor) -> Tensor:
        if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"gramian must be a square 2-D tensor, got {getattr(g, 'shape', g)}")
        if g.shape[0] != self.num_tasks:
            raise ValueError(
                f"gramian is {g.shape[0]}x{g.shape[0]} but the method was created with "
                f"num_tasks={self.num_tasks}"
            )
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError("gramian contains NaN or infinity")
        return g

    def backward(  # type: ignore[override]
        self,
        losses: Tensor,
        *,
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        mode: Mode = "params",
        **ctx: Any,
    ) -> BackwardResult:
        partial = self._partial_step(losses, shared_params, features, mode, ctx)
        if partial is not None:
            return partial
        # Features mode needs only G: the engine forms it without the K x (B D) Jacobian
        # where the heads are linear layers, and the update w @ J is the backward of
        # sum_k w_k L_k. Methods that override _aggregate take the generic path.
        if (
            self.sync is not None
            or mode != "features"
            or type(self)._aggregate is not GramianMethod._aggregate
        ):
            return super().backward(
                losses, shared_params=shared_params, features=features, mode=mode, **ctx
            )
        losses, shared = self._validate(losses, shared_params, mode, features, ctx)
        ctx.pop("num_samples", None)
        scale = ctx.pop("loss_scale", None)
        assert features is not None
        g = self.engine.gramian(losses, [features])
        if scale is not None:
            if not bool(torch.isfinite(g).all()):
                return _skip_step(shared, mode, features)
            g = g / scale**2
        if not bool(torch.isfinite(g).all()):
            # Name the task(s) from the Jacobian; if it is finite, G overflowed.
            _check_finite_rows(self.engine(losses, [features]), "gradient")
            raise NonFiniteError(
                "the Gramian of the task gradients overflowed (gradient norms above ~1e19); "
                "lower the learning rate or the loss scale"
            )
        w = self._weights(
            g,
            losses=losses.detach() if scale is None else losses.detach() / scale,
            param_sizes=(features.numel(),),
            mode=mode,
            features=features,
            **ctx,
        )
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(
                f"{type(self).__name__} produced non-finite weights {w.tolist()} from a finite "
                "Gramian; please report this as a bug"
            )
        w = w.detach()
        head_w = self._head_weights(w)
        if head_w is None:
            # One backward: task parameters get w_k g_k, the encoder w @ J.
            torch.autograd.backward(losses, grad_tensors=w.to(losses))
        else:
            (direction,) = torch.autograd.grad(
                losses, features, grad_outputs=w.to(losses), retain_graph=True
            )
            task_leaves = leaves_reached([losses], stop_at=[features])
            if task_leaves:
                torch.autograd.backward(
                    losses,
                    grad_tensors=head_w.detach().to(losses),
                    inputs=task_leaves,
                    retain_graph=True,
                )
            features.backward(direction)
        return BackwardResult(
            weights=w,
            gramian=g,
            extras={"jacobian_norms": g.diagonal().clamp_min(0).sqrt(), **self._weight_extras()},
            head_weights=None if head_w is None else head_w.detach(),
        )

    def _aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, **ctx: Any
    ) -> AggregationResult:
        g = gramian(jacobian)
        w = self._weights(g, losses=losses, **ctx)
        direction = w.to(jacobian) @ jacobian
        return AggregationResult(
            direction=direction,
            weights=w,
            extras={"gramian": g, **self._weight_extras()},
            head_weights=self._head_weights(w),
        )

    def _weight_extras(self) -> dict[str, Any]:
        """Diagnostics of the last :meth:`_weights` call, for ``BackwardResult.extras``."""
        return {}

    def _head_weights(self, weights: Tensor) -> Tensor | None:
        """Factors for the task-specific gradients where the paper's differ from ``weights``."""
        return None
