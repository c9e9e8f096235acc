"""Bi-level (meta-learned) balancing methods: one meta-step entry point for all of them.

A meta method learns its task weights (or the model itself, for Sequential Reptile) from
what a virtual training step does to held-out data. It has two entry points:

* ``method.backward(losses, shared_params=...)``: the ordinary step, like every method (the
  weighted sum of the losses with the *current* learned weights);
* ``method.meta_step(model, train_batch, val_batch, loss_fn, inner_lr=... | inner_optimizer=...)``:
  the meta step, called before the ordinary step. ``loss_fn(model, batch) -> Tensor[K]`` returns
  the K task losses of ``model`` on ``batch``; the meta step calls it on the model with
  substituted (look-ahead) parameters through :func:`torch.func.functional_call`, so the model,
  its ``.grad`` and its buffers (BatchNorm statistics) are left untouched.

Loops see ``method.needs_meta_step`` (``False`` on every other method) and, where
``method.meta_step_replaces_step`` is true (Sequential Reptile, whose meta step *is* the model
update), skip the ordinary step. A runnable example (the test suite runs it)::

    >>> import torch
    >>> from torch import nn
    >>> import polytask
    >>> _ = torch.manual_seed(0)
    >>> model = nn.ModuleDict({"encoder": nn.Linear(4, 8),
    ...                        "heads": nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])})
    >>> def loss_fn(model, batch):
    ...     x, ys = batch
    ...     z = torch.tanh(model["encoder"](x))
    ...     return torch.stack([((h(z) - y) ** 2).mean() for h, y in zip(model["heads"], ys)])
    >>> def sample(n=16):
    ...     x = torch.randn(n, 4)
    ...     return x, [x.sum(1, keepdim=True), x[:, :1]]
    >>> method = polytask.methods.create("auto_lambda", num_tasks=2)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> for step in range(3):
    ...     train, val = sample(), sample()
    ...     if method.needs_meta_step:
    ...         meta = method.meta_step(model, train, val, loss_fn, inner_optimizer=optimizer)
    ...     if not method.meta_step_replaces_step:
    ...         optimizer.zero_grad()
    ...         losses = loss_fn(model, train)
    ...         result = method.backward(losses, shared_params=model["encoder"].parameters())
    ...         optimizer.step()
    >>> meta.weights.shape, result.weights.shape
    (torch.Size([2]), torch.Size([2]))

The look-ahead is one step of the optimizer the model trains with: pass that
``torch.optim.SGD`` as ``inner_optimizer`` (its learning rate, momentum buffer, dampening,
Nesterov flag and weight decay enter the virtual step, as in Auto-Lambda's official code), or
``inner_lr`` for a plain SGD step (MOML's official code uses a plain SGD step of the model's
learning rate even though it trains the model with Adam).

The hyper-gradient of a validation loss V(theta') through the virtual step
theta' = theta - a * (sum_i w_i grad L_i(theta)) - const (a: the per-parameter step size, the
learning rate times the momentum/Nesterov factor) is exactly

    dV/dw_i = -< a * grad V(theta'), grad L_i(theta) >,

a directional derivative of the training loss L_i along u = a * grad V(theta'). The second
derivative that DARTS-style code approximates by finite differences is here a mixed one, which
for a weighted sum of losses reduces to the task gradients, so no Hessian of the network is
ever needed. :func:`lookahead_hypergradient` computes it either by central differences
(L_i(theta + eps u) - L_i(theta - eps u)) / (2 eps), eps = 0.01 / ||u|| (``"finite_difference"``,
Auto-Lambda's official code: one backward and two forwards per direction), or exactly from the
K task gradients (``"exact"``: K backwards; MOML's official code gets the same number by
differentiating through the step with ``create_graph=True``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from polytask.autograd import jacobian
from polytask.errors import (
    EmptyParametersError,
    InvalidHyperparameterError,
    InvalidLossesError,
    NonFiniteError,
)
from polytask.methods.base import LossMethod

__all__ = [
    "HESSIAN_MODES",
    "FunctionalModel",
    "LossFn",
    "MetaMethod",
    "MetaStepResult",
    "check_hessian",
    "check_inner_step",
    "check_meta_lr",
    "check_task_losses",
    "lookahead_hypergradient",
    "trainable_parameters",
]

#: ``loss_fn(model, batch) -> Tensor[K]``: the K task losses of ``model`` on ``batch``.
LossFn = Callable[[nn.Module, Any], Tensor]

#: How :func:`lookahead_hypergradient` computes the directional derivatives.
HESSIAN_MODES = ("finite_difference", "exact")

#: Size of the finite-difference perturbation ||eps u|| (Auto-Lambda's official code, from DARTS).
_FD_RADIUS = 0.01


@dataclass
class MetaStepResult:
    """What :meth:`MetaMethod.meta_step` returns.

    Attributes:
        weights: the task weights after the meta step [K] (detached), or ``None`` where the
            method has none (Sequential Reptile).
        meta_gradient: the gradient the meta optimizer was given, w.r.t. the method's learnable
            parameter (detached), or ``None``.
        val_losses: the K validation losses at the look-ahead parameters (detached), or
            ``None`` where the method uses no validation batch.
        extras: method-specific diagnostics.
    """

    weights: Tensor | None
    meta_gradient: Tensor | None = None
    val_losses: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class MetaMethod(LossMethod):
    """A bi-level method: an ordinary weighted step plus a :meth:`meta_step`.

    ``backward`` minimises sum_k w_k L_k with the current weights :meth:`task_weights`, held
    constant (the meta step alone moves them). Subclasses implement :meth:`task_weights` and
    :meth:`meta_step`. Methods that learn their weights keep them in an ``nn.Parameter``
    updated by their own meta optimizer inside :meth:`meta_step` (its state is in
    ``state_dict()``); do not add ``method.parameters()`` to the model's optimizer.
    """

    needs_meta_step: ClassVar[bool] = True
    #: Whether :meth:`meta_step` updates the model itself, so loops skip the ordinary step.
    meta_step_replaces_step: ClassVar[bool] = False
    #: Whether :meth:`meta_step` reduces over the ranks under
    #: :func:`polytask.distributed.distribute` (see :func:`lookahead_hypergradient`).
    meta_step_distributed: ClassVar[bool] = False

    def task_weights(self) -> Tensor:
        """The current task weights [K] (detached)."""
        raise NotImplementedError

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        # A copy: task_weights() may be a view of the learned parameter, which the next meta
        # step updates in place; the reported weights must stay those of this step.
        w = self.task_weights().to(losses, copy=True)
        return (w * losses).sum(), w

    def meta_step(
        self,
        model: nn.Module,
        train_batch: Any,
        val_batch: Any,
        loss_fn: LossFn,
        *,
        inner_lr: float | None = None,
        inner_optimizer: torch.optim.Optimizer | None = None,
        num_samples: tuple[float, float] | None = None,
    ) -> MetaStepResult:
        """One meta update from ``train_batch`` (the virtual step) and ``val_batch``.

        Args:
            model: the multi-task model (any ``nn.Module``); all its trainable parameters take
                part in the virtual step.
            train_batch: the batch of the virtual step, passed to ``loss_fn`` as is.
            val_batch: the held-out batch the look-ahead model is judged on.
            loss_fn: ``loss_fn(model, batch) -> Tensor[K]``.
            inner_lr: learning rate of a plain SGD virtual step; or
            inner_optimizer: the ``torch.optim.SGD`` the model trains with (exactly one of
                the two).
            num_samples: under :func:`polytask.distributed.distribute`, this rank's numbers
                of training and validation samples (default: equal shares); ``model`` is
                the plain module (not a DDP wrapper).
        """
        raise NotImplementedError

    def _make_meta_optimizer(self, param: nn.Parameter, lr: float) -> None:
        self._meta_optimizer = torch.optim.Adam([param], lr=lr)

    def _apply_meta_gradient(self, param: nn.Parameter, grad: Tensor) -> None:
        # The official codes set .grad (not accumulate) and step Adam; clearing it afterwards
        # keeps an outer optimizer that holds the parameter by mistake from stepping it again.
        param.grad = grad.detach().to(param)
        self._meta_optimizer.step()
        param.grad = None

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        if hasattr(self, "_meta_optimizer"):
            state["meta_optimizer"] = self._meta_optimizer.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "meta_optimizer" in state:
            # A copy: Optimizer.load_state_dict keeps the given moment tensors, which Adam then
            # updates in place, so loading another live method's state_dict would alias (and
            # corrupt) that method's moments, unlike the parameters, which are copied in.
            self._meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))


# -- checks -------------------------------------------------------------------------------


def check_inner_step(
    inner_lr: float | None, inner_optimizer: torch.optim.Optimizer | None, *, sgd_only: bool
) -> None:
    """Exactly one of ``inner_lr`` (positive, finite) and ``inner_optimizer``."""
    if (inner_lr is None) == (inner_optimizer is None):
        raise TypeError(
            "meta_step needs exactly one of inner_lr=<learning rate of a plain SGD step> and "
            "inner_optimizer=<the torch.optim.SGD the model trains with>; got "
            + ("both" if inner_lr is not None else "neither")
        )
    if inner_lr is not None:
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
            raise TypeError(f"inner_lr must be a float, got {type(inner_lr).__name__}")
        if not math.isfinite(inner_lr) or inner_lr <= 0:
            raise ValueError(f"inner_lr={inner_lr!r} must be a positive finite learning rate")
    if inner_optimizer is not None:
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer must be a torch.optim.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        if sgd_only and not isinstance(inner_optimizer, torch.optim.SGD):
            raise TypeError(
                f"inner_optimizer is a {type(inner_optimizer).__name__}, but the virtual step "
                "is an SGD step (as in the paper); pass the model's torch.optim.SGD, or "
                "inner_lr=<the model's learning rate> for a plain SGD look-ahead"
            )
        if any(g.get("maximize", False) for g in inner_optimizer.param_groups):
            raise ValueError("inner_optimizer has maximize=True; the look-ahead is a descent step")


def trainable_parameters(model: Any, owner: str) -> tuple[list[str], list[Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}.meta_step needs the model as an nn.Module, got {type(model)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise EmptyParametersError(
            f"{owner}.meta_step: the model has no parameter that requires grad"
        )
    return [n for n, _ in named], [p for _, p in named]


def check_task_losses(value: Any, num_tasks: int, what: str, *, graph: bool = True) -> Tensor:
    """Validate ``loss_fn``'s output on ``what`` (a name for the message) as K finite losses."""
    if not isinstance(value, Tensor) or value.shape != (num_tasks,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InvalidLossesError(
            f"loss_fn(model, {what}) must return a 1-D tensor of the {num_tasks} task losses "
            f"(torch.stack([loss_1, ..., loss_K])), got {shape}"
        )
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise NonFiniteError(
            f"loss_fn(model, {what}) gave non-finite losses for task(s) {bad}: "
            f"{value.detach().tolist()}; check that batch and the learning rates"
        )
    if graph and not value.requires_grad:
        raise InvalidLossesError(
            f"loss_fn(model, {what}) returned losses that do not require grad; compute them "
            "from the model's output without torch.no_grad() or .detach()"
        )
    return value


# -- the model as a function of its parameters ----------------------------------------------


class _LossCall(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's
    parameters while ``loss_fn`` still sees the model object (``model.encoder``, ...)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class FunctionalModel:
    """The K task losses of a model as a function of its trainable parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, num_tasks: int, owner: str) -> None:
        if not callable(loss_fn):
            raise TypeError(
                f"{owner}.meta_step needs loss_fn(model, batch) -> Tensor[K], got "
                f"{type(loss_fn).__name__}"
            )
        self.names, self.params = trainable_parameters(model, owner)
        self.num_tasks = num_tasks
        self._call = _LossCall(model, loss_fn)
        # Copies: forwards in train mode update BatchNorm statistics, which the meta step's
        # virtual and perturbed forwards must not do to the real model.
        self._buffers = {f"model.{n}": b.detach().clone() for n, b in model.named_buffers()}

    def losses(
        self, params: Sequence[Tensor], batch: Any, what: str, *, graph: bool = True
    ) -> Tensor:
        """``loss_fn(model, batch)`` with the model's trainable parameters set to ``params``."""
        mapping = {f"model.{n}": p for n, p in zip(self.names, params)}
        mapping.update(self._buffers)
        out = functional_call(self._call, mapping, (batch,))
        return check_task_losses(out, self.num_tasks, what, graph=graph)

    def flat(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                (t if t is not None else torch.zeros_like(p)).reshape(-1)
                for t, p in zip(tensors, self.params)
            ]
        )

    def unflat(self, vector: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out


@contextlib.contextmanager
def _same_randomness(devices: list[torch.device]) -> Iterator[Callable[[], None]]:
    """Yields ``rewind()``, which restores the RNG state of entry, so that two forwards see the
    same dropout masks (the perturbed forwards of a finite difference)."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(i) for i in cuda]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for i, s in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(s, i)

        yield rewind


# -- the virtual step -----------------------------------------------------------------------


def _sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    inner_lr: float | None,
    inner_optimizer: torch.optim.Optimizer | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """theta' = theta - lr * step(g), and the factor a with d theta' / d g = -a, per parameter.

    With ``inner_optimizer`` (SGD): torch's update rule with the group's lr, momentum,
    dampening, Nesterov flag and weight decay, and the current momentum buffer (absent on the
    first step, where torch sets the buffer to the gradient). Parameters the optimizer does
    not hold stay fixed (a = 0), as they do in the real step.
    """
    groups = {}
    if inner_optimizer is not None:
        for group in inner_optimizer.param_groups:
            for p in group["params"]:
                groups[id(p)] = group
        if not any(id(p) in groups for p in params):
            raise ValueError(
                "inner_optimizer holds none of the model's trainable parameters; pass the "
                "optimizer that trains this model"
            )
    new, scale = [], []
    for p, g in zip(params, grads):
        theta = p.detach()
        if inner_optimizer is None:
            new.append(theta - inner_lr * g)
            scale.append(torch.full_like(theta, float(inner_lr)))
            continue
        group = groups.get(id(p))
        if group is None:
            new.append(theta.clone())
            scale.append(torch.zeros_like(theta))
            continue
        lr = float(group["lr"])
        mu, damp = float(group["momentum"]), float(group["dampening"])
        wd, nesterov = float(group["weight_decay"]), bool(group["nesterov"])
        d = g + wd * theta if wd else g
        factor = 1.0
        if mu:
            buf = inner_optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                new_buf, factor = d, 1.0
            else:
                new_buf, factor = mu * buf + (1.0 - damp) * d, 1.0 - damp
            if nesterov:
                d, factor = d + mu * new_buf, 1.0 + mu * factor
            else:
                d = new_buf
        new.append(theta - lr * d)
        scale.append(torch.full_like(theta, lr * factor))
    return new, scale


class _Means:
    """Count-weighted means over the ranks of a process group (identity on one process):
    under :func:`polytask.distributed.distribute` each rank's batch is its share of the
    global batch, and every quantity of the look-ahead is a mean over samples."""

    def __init__(self, sync: Any, count: float | None) -> None:
        self.sync, self.count = sync, 1.0 if count is None else float(count)

    def __call__(self, *tensors: Tensor) -> list[Tensor]:
        if self.sync is None:
            return list(tensors)
        flat = torch.cat(
            [tensors[0].new_tensor([self.count])]
            + [self.count * t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors]
        )
        self.sync.comm.all_reduce(flat)
        out, offset = [], 1
        for t in tensors:
            out.append((flat[offset : offset + t.numel()] / flat[0]).view_as(t).to(t.dtype))
            offset += t.numel()
        return out


def lookahead_hypergradient(
    fmodel: FunctionalModel,
    train_batch: Any,
    val_batch: Any,
    weights: Tensor,
    combinations: Tensor,
    *,
    inner_lr: float | None,
    inner_optimizer: torch.optim.Optimizer | None,
    hessian: str,
    sync: Any = None,
    num_samples: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """d/dw of M combinations of the validation losses after one virtual step.

    The virtual step minimises sum_i w_i L_i(theta) on ``train_batch``; row m of the result
    is d/dw [sum_k combinations[m, k] V_k(theta'(w))], V the losses on ``val_batch``.

    With ``sync`` (a distributed method's), the batches are this rank's shares of the global
    ones (``num_samples``: this rank's numbers of training and validation samples; default
    equal shares), and the training gradient, the validation gradients and losses and the
    finite differences are reduced over the ranks, so every rank returns the hyper-gradient
    of the concatenated batches.

    Returns:
        (hyper-gradients [M, K], validation losses at theta' [K], training losses [K]), all
        detached, in the losses' dtype.
    """
    n_train, n_val = num_samples if num_samples is not None else (None, None)
    train_mean, val_mean = _Means(sync, n_train), _Means(sync, n_val)
    params = fmodel.params
    train = fmodel.losses(params, train_batch, "train_batch")
    w = weights.detach().to(train)
    if hessian == "exact":
        jac = jacobian(train, params, strategy="loop", retain_graph=False)
        train_losses, jac = train_mean(train.detach(), jac)
        grads = fmodel.unflat(w @ jac)
    else:
        grads = torch.autograd.grad((w * train).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        train_losses, flat = train_mean(train.detach(), fmodel.flat(grads))
        grads = fmodel.unflat(flat)
    stepped, scale = _sgd_step(params, [g.detach() for g in grads], inner_lr, inner_optimizer)
    stepped = [t.detach().requires_grad_() for t in stepped]
    val = fmodel.losses(stepped, val_batch, "val_batch")
    a = fmodel.flat(scale)
    combos = combinations.to(val)
    val_grads = []
    for m in range(combos.shape[0]):
        vg = torch.autograd.grad(
            combos[m] @ val, stepped, retain_graph=m + 1 < combos.shape[0], allow_unused=True
        )
        val_grads.append(fmodel.flat(vg))
    val_losses, val_grads_mean = val_mean(val.detach(), torch.stack(val_grads))
    u = a * val_grads_mean
    if hessian == "exact":
        derivative = u @ jac.T
    else:
        derivative = _central_differences(fmodel, train_batch, u, train_mean)
    return -derivative.detach(), val_losses.detach(), train_losses.detach()


def _central_differences(
    fmodel: FunctionalModel, batch: Any, directions: Tensor, mean: _Means | None = None
) -> Tensor:
    """Rows m: (L(theta + eps u_m) - L(theta - eps u_m)) / (2 eps), eps = 0.01 / ||u_m||;
    ``mean`` reduces the differences over the ranks."""
    theta = fmodel.flat([p.detach() for p in fmodel.params])
    rows = []
    devices = [p.device for p in fmodel.params]
    for u in directions:
        norm = float(u.norm())
        if norm == 0.0:
            # No direction: the validation loss does not depend on the step, so neither on w.
            rows.append(torch.zeros(fmodel.num_tasks, dtype=u.dtype, device=u.device))
            continue
        eps = _FD_RADIUS / norm
        with torch.no_grad(), _same_randomness(devices) as rewind:
            plus = fmodel.losses(fmodel.unflat(theta + eps * u), batch, "train_batch", graph=False)
            rewind()
            minus = fmodel.losses(fmodel.unflat(theta - eps * u), batch, "train_batch", graph=False)
        difference = (plus - minus).to(u)
        if mean is not None:
            (difference,) = mean(difference)
        rows.append(difference / (2.0 * eps))
    return torch.stack(rows)


def check_hessian(hessian: str) -> str:
    if hessian not in HESSIAN_MODES:
        raise InvalidHyperparameterError(
            f"hessian={hessian!r} must be one of {', '.join(map(repr, HESSIAN_MODES))}"
        )
    return hessian


def check_meta_lr(meta_lr: float) -> float:
    if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)):
        raise InvalidHyperparameterError(f"meta_lr={meta_lr!r} must be a float")
    if not math.isfinite(meta_lr) or meta_lr <= 0:
        raise InvalidHyperparameterError(f"meta_lr={meta_lr!r} must be positive and finite")
    return float(meta_lr)
