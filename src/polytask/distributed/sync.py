"""Attaching a method to a process group: :func:`distribute`, :func:`local`, and the checks
that keep the ranks from drifting apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from polytask.distributed.comm import Communicator
from polytask.errors import DistributedError

if TYPE_CHECKING:
    from polytask.methods.base import Method

__all__ = [
    "PARAMS_STRATEGIES",
    "DistributedSync",
    "broadcast_parameters",
    "distribute",
    "local",
    "rank_and_world",
    "require_decision",
    "task_counts",
]

ParamsStrategy = Literal["auto", "full", "sharded"]
PARAMS_STRATEGIES: tuple[str, ...] = ("auto", "full", "sharded")

#: ``"auto"`` shards the params-mode Jacobian of a Gramian method from this many elements
#: (K x P) on: 2^24 float32 elements are 64 MiB per rank per step.
SHARD_MIN_ELEMENTS = 2**24


def _wrapper(model: nn.Module | None) -> str | None:
    """``"ddp"``, ``"fsdp"`` or ``None`` (a plain module, or no model given)."""
    if model is None:
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return "fsdp"
    except ImportError:  # pragma: no cover - torch without FSDP
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6 (fully_shard)

        if isinstance(model, FSDPModule):
            return "fsdp"
    except ImportError:  # pragma: no cover - older torch
        pass
    return None


@dataclass
class DistributedSync:
    """How a method balances over the ranks of a process group (see :func:`distribute`).

    Attributes:
        comm: the process group and the log of collectives.
        model: the model as the training loop calls it (DDP/FSDP-wrapped or plain), or
            ``None``.
        params_strategy: ``"full"`` (one all-reduce of the K x P Jacobian), ``"sharded"``
            (reduce-scatter, K x K all-reduce, all-gather; Gramian methods only) or
            ``"auto"`` (sharded for Gramian methods from ``shard_min_elements`` on).
        shard_min_elements: K x P from which ``"auto"`` shards.
    """

    comm: Communicator
    model: nn.Module | None = None
    params_strategy: ParamsStrategy = "auto"
    shard_min_elements: int = SHARD_MIN_ELEMENTS
    #: Whether the first DDP-reduced step was checked (see :meth:`verify_wrapper_reduced`).
    verified: bool = False

    @property
    def wrapper(self) -> str | None:
        return _wrapper(self.model)

    def reducer(self) -> Literal["wrapper", "polytask"]:
        """Who sums the parameter gradients over the ranks in this step.

        ``"wrapper"``: DDP (outside ``no_sync()``) or FSDP, which average them; polytask
        then scales the local backward by the world size. ``"polytask"``: a plain module, or
        DDP inside ``no_sync()``; polytask all-reduces the step's gradients itself.
        """
        kind = self.wrapper
        if kind == "fsdp":
            return "wrapper"
        model: Any = self.model
        if kind == "ddp" and model.require_backward_grad_sync:
            if model.find_unused_parameters or model.static_graph:
                # Both attach DDP's output sink, through which polytask's per-task passes
                # would run and end DDP's reduction before the real backward.
                flag = "find_unused_parameters" if model.find_unused_parameters else "static_graph"
                raise DistributedError(
                    f"DistributedDataParallel({flag}=True) reduces gradients at the end of the "
                    "first backward pass through the model's outputs, and polytask's task "
                    "gradients are such a pass: the update would be wrong. Build DDP with its "
                    "default flags, or run the forward and method.backward inside `with "
                    "model.no_sync():` (polytask then reduces), or give distribute() the plain "
                    "module"
                )
            return "wrapper"
        return "polytask"

    def check_params_mode(self, method: Method) -> None:
        """Params mode takes K gradients through one forward: refuse a wrapper that would
        all-reduce (or never see) them."""
        kind = self.wrapper
        name = type(method).__name__
        if kind == "fsdp":
            raise DistributedError(
                f"{name}.backward(mode='params') needs every rank's full gradient of each task "
                "w.r.t. the shared parameters, which FSDP shards away; use mode='features' "
                "with FSDP, or DistributedDataParallel (or a plain module) in params mode"
            )
        if kind == "ddp" and self.model.require_backward_grad_sync:  # type: ignore[union-attr]
            raise DistributedError(
                f"{name}.backward(mode='params') under DistributedDataParallel needs the "
                "forward pass and method.backward inside one `with model.no_sync():` block "
                "(polytask all-reduces the task gradients itself; DDP's hooks would reduce "
                "only part of them and the ranks would drift); or use mode='features', which "
                "keeps DDP's own all-reduce"
            )

    def verify_wrapper_reduced(self) -> None:
        """After the first step that DDP was to reduce: check that it did. A forward that
        bypassed the DDP module (``ddp.module(x)``, ``ddp.module.encoder(x)``) leaves every
        rank its own gradients and DDP says nothing; two numbers per rank catch it."""
        if self.verified or self.wrapper != "ddp":
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]  # type: ignore[union-attr]
        if not grads:
            return
        s = torch.stack([g.double().sum() for g in grads]).sum()
        a = torch.stack([g.double().abs().sum() for g in grads]).sum()
        stats = torch.stack([s, a, s * s, a * a])
        self.comm.all_reduce(stats)
        r = self.comm.world_size
        spread = torch.stack(
            [stats[2] / r - (stats[0] / r) ** 2, stats[3] / r - (stats[1] / r) ** 2]
        )
        scale = torch.stack([(stats[0] / r) ** 2, (stats[1] / r) ** 2]).clamp_min(1e-300)
        if bool((spread.abs() > 1e-9 * scale).any()):
            raise DistributedError(
                "the ranks hold different gradients after a step that DistributedDataParallel "
                "was to all-reduce: the forward pass did not go through the DDP module (e.g. "
                "ddp.module(x) or ddp.module.encoder(x)), so DDP reduced nothing. Call the "
                "DDP module itself (have its forward return the shared features too), or "
                "pass the plain module to distribute() and let polytask reduce"
            )
        self.verified = True

    def mean_losses(self, losses: Tensor, num_samples: Any) -> Tensor:
        """The count-weighted mean of every rank's ``losses`` (detached), one all-reduce;
        ``num_samples``: this rank's count, one for every task or one per task."""
        k = losses.shape[0]
        like = losses.detach()
        n = task_counts(num_samples, k, like.device)
        payload = torch.cat([n, n * like.double()])
        self.comm.all_reduce(payload)
        return (payload[k:] / payload[:k]).to(like.dtype)


def task_counts(num_samples: Any, k: int, device: torch.device) -> Tensor:
    """This rank's number of samples of each task [K] in float64 on ``device``, from
    ``num_samples``: one number for every task, a tensor of one per task, or ``None`` (1:
    equal shares)."""
    if isinstance(num_samples, Tensor) and num_samples.dim() == 1:
        return num_samples.detach().to(device, torch.float64)
    value = 1.0 if num_samples is None else float(num_samples)
    return torch.full((k,), value, dtype=torch.float64, device=device)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def require_decision(method: Method) -> None:
    """Refuse to balance one rank's batch alone when a process group is running, unless the
    user chose that with :func:`local`: that silent case is how the ranks drift apart."""
    if method.sync is not None or method.rank_local:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise DistributedError(
            f"torch.distributed is running with {dist.get_world_size()} ranks, but this "
            f"{type(method).__name__} would balance this rank's batch alone and the ranks "
            "would drift apart; call polytask.distributed.distribute(method, model) once "
            "after wrapping the model (the method then balances the global batch), or "
            "polytask.distributed.local(method) if each rank should balance on its own"
        )


def local(method: Method) -> Method:
    """Let ``method`` balance each rank's own batch while a process group runs (on purpose:
    e.g. every rank trains its own model). Returns ``method``."""
    method.sync = None
    method.rank_local = True
    return method


@torch.no_grad()
def broadcast_parameters(module: nn.Module, comm: Communicator, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at wrap time;
    needed when polytask reduces the gradients of a plain module itself)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        comm.broadcast(tensor.data, src)


def _cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}


def distribute(
    method: Method,
    model: nn.Module | None = None,
    *,
    group: Any = None,
    params_strategy: ParamsStrategy = "auto",
    shard_min_elements: int = SHARD_MIN_ELEMENTS,
) -> Method:
    """Make ``method`` balance the global batch of a ``torch.distributed`` process group.

    Call it on every rank after ``init_process_group`` (and after wrapping the model), then
    use ``method.backward`` as usual, passing ``num_samples=`` (this rank's number of
    samples) where the ranks' batches may differ in size. Each step then equals one
    single-process step on the concatenation of the ranks' batches (rank order): the losses,
    the Jacobian or Gramian, the weights, every parameter's ``.grad`` and the method's state.

    It copies rank 0's method state (learnable parameters, history, random generator) to
    every rank, and rank 0's parameters and buffers to every rank when ``model`` is a plain
    module (DDP and FSDP do that themselves).

    Args:
        method: the method to distribute (returned).
        model: the model as the loop calls it: ``DistributedDataParallel`` (params mode
            under ``no_sync()``; features mode and loss weightings with DDP's own
            all-reduce), FSDP (features mode and loss weightings), or a plain module (polytask
            all-reduces every gradient itself). ``None``: a plain model whose parameters the
            caller keeps identical.
        group: the process group (default: the world).
        params_strategy: see :class:`DistributedSync`.
        shard_min_elements: K x P from which ``"auto"`` shards.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "polytask.distributed.distribute needs a running process group; call "
            "torch.distributed.init_process_group(...) first (torchrun sets its environment)"
        )
    if params_strategy not in PARAMS_STRATEGIES:
        raise ValueError(
            f"params_strategy={params_strategy!r} must be one of {list(PARAMS_STRATEGIES)}"
        )
    if isinstance(shard_min_elements, bool) or not isinstance(shard_min_elements, int):
        raise ValueError(f"shard_min_elements={shard_min_elements!r} must be an integer")
    reason = method.why_not_distributable()
    if reason is not None:
        raise DistributedError(
            f"{type(method).__name__} cannot balance across ranks: {reason} "
            "(docs/distributed.md lists what is supported)"
        )
    comm = Communicator(group)
    sync = DistributedSync(comm, model, params_strategy, shard_min_elements)
    wrapped_group = getattr(model, "process_group", None)
    if sync.wrapper == "ddp" and group is not None and wrapped_group is not group:
        raise DistributedError(
            "distribute(group=...) differs from the process group the DDP model reduces "
            "over; pass the same group to both (DDP(..., process_group=group))"
        )
    state = comm.broadcast_object(_cpu_state(method.state_dict()) if comm.rank == 0 else None)
    method.load_state_dict(state)
    if model is not None and sync.wrapper is None:
        broadcast_parameters(model, comm)
    comm.clear()
    method.sync = sync
    method.rank_local = False
    return method
