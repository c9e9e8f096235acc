"""The training loop: any model, any balancing method, any optimizer; exact resume.

The trainer owns the loop (data -> model -> task losses -> ``method.backward`` -> optimizer),
evaluates on validation and test after every epoch, selects the model on validation only and
reports test at the selected epoch. A checkpoint holds the model, optimizer, scheduler,
method state, sampler position and RNG states, so a killed run resumed from its last
checkpoint ends with the same numbers as an uninterrupted one (on CPU, where the kernels are
deterministic).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from polytask.distributed import distribute, rank_and_world
from polytask.distributed.backward import reduce_backward
from polytask.methods import Method
from polytask.methods.context import CONTEXT
from polytask.results import delta_m
from polytask.tasks import SplitMetrics, TaskSet
from polytask.tasks.losses import has_labels
from polytask.train.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from polytask.train.logger import JsonlLogger
from polytask.train.sampler import ResumableBatchSampler

__all__ = ["TrainConfig", "TrainResult", "Trainer"]

Precision = Literal["fp32", "bf16", "fp16"]
#: Context keys the trainer supplies itself; others come from ``context_fn``.
_SUPPLIED = frozenset({"epoch", "val_losses", "kpis", "present"})


@dataclass
class TrainConfig:
    """The recipe of one run.

    Attributes:
        epochs: passes over the training set.
        batch_size: training batch size; ``eval_batch_size`` defaults to it.
        mode: ``"params"`` balances the shared parameters' gradients, ``"features"`` the
            shared representation's (needs a model with ``encode``/``decode``).
        precision: ``"fp32"``, ``"bf16"`` (autocast; bf16 has fp32's range, so no loss
            scaling) or ``"fp16"`` (autocast with a ``torch.amp.GradScaler``: the losses are
            scaled before the backward passes and every method balances the unscaled task
            gradients, through the ``loss_scale`` context key).
        grad_clip: clip the global gradient norm to this value after balancing.
        accumulate: micro-batches per optimizer step; each micro-batch is balanced by the
            method on its own and the directions are summed (exact for loss weightings).
        scheduler_interval: step the LR scheduler every ``"epoch"`` or every ``"step"``.
        select: model selection on validation: ``"delta_m"`` (against ``baselines`` when
            given, else against the first validation scores of this run), ``"loss"`` (sum of
            validation losses) or one ``"task/metric"`` name.
        kpi_metrics: for methods that need KPIs (DTP): task -> the ``"task/metric"`` in [0, 1]
            (higher is better) whose latest validation value is the task's KPI.
        checkpoint_every: also checkpoint every this many optimizer steps (besides each epoch).
        seed: seeds the model's RNG streams, the data order and the method.
        device: ``"cpu"`` or ``"cuda"`` etc.
        num_workers: DataLoader workers.
        progress: show rich progress bars.
        tensorboard: mirror the log to TensorBoard under ``out_dir/tb``.
    """

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int | None = None
    mode: Literal["params", "features"] = "params"
    precision: Precision = "fp32"
    grad_clip: float | None = None
    accumulate: int = 1
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    select: str = "delta_m"
    kpi_metrics: dict[str, str] | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.mode not in ("params", "features"):
            raise ValueError(f"mode={self.mode!r} must be 'params' or 'features'")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r} must be 'fp32', 'bf16' or 'fp16'")
        if self.accumulate < 1:
            raise ValueError(f"accumulate={self.accumulate} must be at least 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be positive (or None)")
        for name in ("eval_batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer (or None)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be non-negative")
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={self.scheduler_interval!r}: 'epoch' or 'step'")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_epoch: the epoch (1-based) selected on validation.
        val: validation metrics at ``best_epoch``.
        test: test metrics at ``best_epoch`` (empty without a test set).
        history: one dict per epoch: ``epoch``, ``val``, ``test``, ``val_losses``,
            ``train_losses``, ``weights`` (the method's mean task weights over the epoch, or
            ``None``) and ``score`` (the selection score, lower is better).
        wall_time: seconds spent training, summed over the processes of a resumed run.
    """

    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict) and inputs:
        return _batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    return 1


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


class _Interrupt(Exception):
    """Raised by ``stop_after_steps`` to simulate a killed run in tests."""


class Trainer:
    """Train ``model`` on ``tasks`` with a balancing ``method``.

    Args:
        model: returns ``{task: output}`` from a batch's inputs (a
            :class:`polytask.archs.MultiTaskModel` or any module with that behaviour).
        tasks: the tasks' losses and metrics.
        method: a :class:`polytask.methods.Method` (``polytask.methods.create(...)``).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called with the model's
            and the method's parameters (UW's log-variances, IMTL-L's scales, ...).
        train, val, test: map-style data sets whose items are ``(inputs, {task: target})``.
        config: the recipe (:class:`TrainConfig`).
        scheduler: ``scheduler(optimizer) -> LRScheduler`` (optional).
        shared_params: the parameters to balance; default ``model.shared_parameters()``.
        baselines: single-task validation scores (``"task/metric"`` -> value) for Δm-based
            selection; default: this run's first validation scores.
        context_fn: ``context_fn(inputs, targets, outputs) -> dict`` for context keys the
            trainer cannot supply itself (e.g. ``sample_losses``).
        train_loss: replaces the tasks' losses in training (evaluation keeps them):
            ``train_loss(outputs, targets, inputs=inputs) -> Tensor[K]`` (and ``features=``
            if it takes that argument), e.g. :class:`polytask.distill.BornAgainDistillation`.
            When it is an ``nn.Module`` its parameters join the optimizer, its state the
            checkpoint, and its ``step()`` (a schedule, like BAM's teacher annealing) is
            called after each optimizer step. ``features`` is the shared representation in
            features mode, else ``None``.
        out_dir: where ``last.pt`` (checkpoint) and ``log.jsonl`` go; ``None`` keeps nothing.

    Under ``torchrun`` (a ``torch.distributed`` process group of several ranks, initialised
    before the trainer is built), every rank builds the same trainer: ``batch_size`` stays
    the global batch, split across the ranks (:class:`ResumableBatchSampler`); the method
    balances the global batch (:func:`polytask.distributed.distribute`; polytask reduces
    every gradient, including the model's regularisers and auxiliary losses); BatchNorm-style
    buffers follow rank 0 at each step, as DDP's default; evaluation splits the validation
    and test sets across the ranks and syncs the metrics and losses; only rank 0 writes the
    checkpoint and the log, and every rank resumes from it.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSet,
        method: Method,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        train: Dataset,
        val: Dataset,
        test: Dataset | None = None,
        *,
        config: TrainConfig | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        shared_params: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None,
        baselines: dict[str, float] | None = None,
        context_fn: Callable[..., dict[str, Any]] | None = None,
        train_loss: Callable[..., Tensor] | None = None,
        out_dir: str | Path | None = None,
    ) -> None:
        self.config = config = config or TrainConfig()
        if not isinstance(method, Method):
            raise TypeError(
                f"method must be a polytask Method, got {type(method).__name__}; build one with "
                "polytask.methods.create(name, num_tasks)"
            )
        if method.num_tasks != len(tasks):
            raise ValueError(
                f"the method was created for {method.num_tasks} tasks but there are "
                f"{len(tasks)} tasks ({tasks.names})"
            )
        if config.mode == "features" and not getattr(model, "has_shared_representation", False):
            raise ValueError(
                f"mode='features' needs a model with encode/decode (a MultiTaskModel with "
                f"has_shared_representation); {type(model).__name__} has none: use mode='params'"
            )
        if method.has_task_views and config.mode != "features":
            raise ValueError(
                f"{type(method).__name__} feeds each task head its own view of the shared "
                f"representation, which needs mode='features' (got mode={config.mode!r})"
            )
        self.needs_extra = sorted(set(method.needs) - _SUPPLIED)
        if self.needs_extra and context_fn is None:
            raise ValueError(
                f"{type(method).__name__} needs {self.needs_extra}, which the trainer cannot "
                "compute itself; pass context_fn=lambda inputs, targets, outputs: {...}"
            )
        # Building every metric to read its direction is not free: done once, here.
        self.directions = directions = tasks.directions
        if config.select not in ("delta_m", "loss") and config.select not in directions:
            raise ValueError(
                f"select={config.select!r} is not 'delta_m', 'loss' or one of the metrics "
                f"{sorted(directions)}"
            )
        if "kpis" in method.needs:
            kpis = config.kpi_metrics or {}
            missing = [t for t in tasks.names if t not in kpis]
            if missing:
                raise ValueError(
                    f"{type(method).__name__} needs KPIs: set TrainConfig.kpi_metrics to map "
                    f"every task to a validation metric in [0, 1]; missing {missing}"
                )
            unknown = {t: m for t, m in kpis.items() if m not in directions}
            if unknown:
                raise ValueError(f"kpi_metrics names unknown metrics {unknown}")
        if config.num_workers > 0 and config.checkpoint_every is not None:
            # Workers reseed their RNGs per epoch: a mid-epoch resume would hand batches to
            # other workers' streams, so random augmentation would differ from the run's.
            raise ValueError(
                "checkpoint_every (mid-epoch checkpoints) needs num_workers=0 for an exact "
                "resume; with workers, runs checkpoint at the end of each epoch"
            )
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.tasks = tasks
        self.method = method.to(self.device)
        self.rank, self.world_size = rank_and_world()
        if self.world_size > 1:
            # Copies rank 0's model and method state to every rank.
            distribute(self.method, self.model)
        # Meta methods update their weights with their own meta optimizer in meta_step.
        own = [] if method.needs_meta_step else list(self.method.parameters())
        self.train_loss = train_loss
        self._loss_takes_features = train_loss is not None and (
            "features" in inspect.signature(train_loss).parameters
        )
        if isinstance(train_loss, nn.Module):
            train_loss.to(self.device)
            own += [p for p in train_loss.parameters() if p.requires_grad]
        params = list(self.model.parameters()) + own
        self.optimizer = optimizer(params)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self._check_optimizer_holds(own)
        self._method_params_checked = False
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self._shared_fn = shared_params
        self.baselines = baselines
        self.context_fn = context_fn
        self.out_dir = None if out_dir is None else Path(out_dir)
        self._writes = self.rank == 0
        self.sampler = ResumableBatchSampler(
            len(train),
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        # Meta methods' extra batches: another shuffle of the training set, as Auto-Lambda's
        # official code uses (the validation split stays for model selection alone).
        self.train_set = train
        self.meta_sampler = ResumableBatchSampler(
            len(train),
            config.batch_size,
            shuffle=True,
            seed=config.seed + 7919,
            rank=self.rank,
            world_size=self.world_size,
        )
        self._meta_batches: Any = None
        # The loader draws its workers' base seed from this generator, not from the global
        # RNG (which dropout uses): reseeded per epoch, a resumed run sees the same streams.
        self._loader_rng = torch.Generator()
        self.train_loader = DataLoader(
            train,
            batch_sampler=self.sampler,
            num_workers=config.num_workers,
            generator=self._loader_rng,
        )
        eval_bs = config.eval_batch_size or config.batch_size
        self.eval_loaders = {
            split: DataLoader(
                self._shard(split, ds),
                batch_size=eval_bs,
                shuffle=False,
                num_workers=config.num_workers,
            )
            for split, ds in (("val", val), ("test", test))
            if ds is not None
        }
        self.step = 0
        self.epoch = 0  # completed epochs
        self.position = 0  # batches of the current epoch already trained on
        self._loss_sums: list[float] = [0.0] * len(tasks)  # this epoch's training losses
        self._loss_count = 0
        self._weight_sums: list[float] | None = None  # and the method's weights
        self._wall_before = 0.0  # training seconds of earlier processes of a resumed run
        self._fit_start = time.perf_counter()
        self._weight_count = 0
        #: Called with each epoch's record (the runner writes it to the results store).
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None
        self._steps_here = 0
        self.history: list[dict[str, Any]] = []
        self.reference: dict[str, float] | None = baselines
        self.latest_val: dict[str, Any] | None = None
        writes = self._writes and self.out_dir is not None
        self.logger = JsonlLogger(
            self.out_dir / "log.jsonl" if writes else None,  # type: ignore[operator]
            self.out_dir / "tb" if (config.tensorboard and writes) else None,  # type: ignore[operator]
        )

    # -- helpers -------------------------------------------------------------------------
    def _shard(self, split: str, dataset: Dataset) -> Dataset:
        """This rank's consecutive part of an evaluation split (the whole split on one rank)."""
        if self.world_size == 1:
            return dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n < self.world_size:
            raise ValueError(
                f"the {split} split has {n} samples, fewer than the {self.world_size} ranks; "
                "run on fewer processes"
            )
        q, r = divmod(n, self.world_size)
        start = self.rank * q + min(self.rank, r)
        return Subset(dataset, range(start, start + q + (self.rank < r)))

    def _rank_seed(self, seed: int) -> int:
        """``seed`` on rank 0 (and in one process); other ranks draw other random numbers
        (dropout, augmentation), as their samples are others."""
        return seed + 104_729 * self.rank

    def _backward_term(self, term: Tensor, num_samples: int) -> None:
        """Backward of a model regulariser or auxiliary loss: reduced over the ranks."""
        if self.method.sync is not None:
            reduce_backward(self.method.sync, term, num_samples)
        else:
            term.backward(retain_graph=True)

    def _check_optimizer_holds(self, params: Iterable[nn.Parameter]) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [tuple(p.shape) for p in params if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the method's parameters of shapes {missing}; "
                "build it from the params the trainer passes to optimizer(params), and create "
                "the method with every size it needs (RotoGrad: latent_size=<the size of the "
                "shared representation>) so that its parameters exist before training"
            )

    def shared_params(self) -> list[nn.Parameter]:
        if self._shared_fn is not None:
            return list(self._shared_fn(self.model))
        if hasattr(self.model, "shared_parameters"):
            return list(self.model.shared_parameters())
        raise ValueError(
            f"{type(self.model).__name__} has no shared_parameters(); pass "
            "shared_params=lambda model: model.encoder.parameters()"
        )

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _to_device(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(self.device, non_blocking=True)
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._to_device(v) for v in value)
        return value

    def _present(self, targets: dict[str, Tensor]) -> Tensor:
        return torch.tensor(
            [
                name in targets and has_labels(targets[name], kind=task.label_kind)
                for name, task in zip(self.tasks.names, self.tasks)
            ],
            dtype=torch.bool,
        )

    def _context(self, inputs: Any, targets: Any, outputs: Any, present: Tensor) -> dict:
        needs = self.method.needs
        ctx: dict[str, Any] = {}
        if "epoch" in needs:
            ctx["epoch"] = self.epoch
        if "val_losses" in needs:
            assert self.latest_val is not None
            ctx["val_losses"] = torch.tensor(self.latest_val["losses"])
        if "kpis" in needs:
            assert self.latest_val is not None and self.config.kpi_metrics is not None
            values = [
                self.latest_val["metrics"][self.config.kpi_metrics[t]] for t in self.tasks.names
            ]
            ctx["kpis"] = torch.tensor(values)
        if not bool(present.all()) or self.method.sync is not None:
            # Under a process group every rank passes it: another rank's batch may lack a task.
            ctx["present"] = present
        if self.context_fn is not None:
            extra = self.context_fn(inputs, targets, outputs)
            unknown = sorted(set(extra) - set(CONTEXT))
            if unknown:
                raise ValueError(f"context_fn returned unknown context keys {unknown}")
            ctx.update(extra)
        return ctx

    # -- the loop ------------------------------------------------------------------------
    def _decode(self, features: Tensor) -> dict[str, Tensor]:
        """The task outputs from the shared representation; with a method that gives each
        task its own view of it (RotoGrad's rotations), head k reads view k."""
        if not self.method.has_task_views:
            return self.model.decode(features)
        views = self.method.task_views(features)
        return {t: self.model.decode(v, task=t) for t, v in zip(self.tasks.names, views)}

    def _forward_losses(self, inputs: Any, targets: dict[str, Tensor]):
        with self._autocast():
            if self.config.mode == "features":
                features = self.model.encode(inputs)
                outputs = self._decode(features)
            else:
                features, outputs = None, self.model(inputs)
            if self.train_loss is None:
                task_losses = [loss.float() for loss in self.tasks.losses(outputs, targets)]
            else:
                extra = {"features": features} if self._loss_takes_features else {}
                values = self.train_loss(outputs, targets, inputs=inputs, **extra)
                if not isinstance(values, Tensor) or values.shape != (len(self.tasks),):
                    raise ValueError(
                        f"train_loss must return a tensor of {len(self.tasks)} task losses, "
                        f"got {getattr(values, 'shape', type(values).__name__)}"
                    )
                task_losses = list(values.float().unbind())
        return features, outputs, task_losses

    def _train_step(
        self, batch: Any, first_micro: bool, last_micro: bool, micro_batches: int = 1
    ) -> dict[str, Any]:
        inputs, targets = self._to_device(batch)
        if self.method.needs_meta_step:
            if self.config.accumulate != 1 or self.scaler.is_enabled():
                raise ValueError(
                    f"{type(self.method).__name__}'s meta step needs accumulate=1 and "
                    "precision 'fp32' or 'bf16'"
                )
            meta = self._meta_step(inputs, targets)
            if getattr(self.method, "meta_step_replaces_step", False):
                self.step += 1  # the meta step was the model's update (Sequential Reptile)
                if self.scheduler is not None and self.config.scheduler_interval == "step":
                    self.scheduler.step()
                return {"losses": meta["losses"], "weights": None, "aux": None}
        if first_micro:
            self.optimizer.zero_grad(set_to_none=True)
        synced = self.method.sync
        if synced is not None:
            # Running statistics (BatchNorm) follow rank 0, as DDP's broadcast_buffers.
            _broadcast_buffers(synced.comm, list(self.model.buffers()))
        n_local = _batch_size(inputs)
        features, outputs, task_losses = self._forward_losses(inputs, targets)
        present = self._present(targets)
        ctx = self._context(inputs, targets, outputs, present)
        if synced is not None:
            ctx["num_samples"] = n_local
        true_losses = torch.stack(task_losses)
        scale = 1.0
        if self.scaler.is_enabled():
            # Each task loss is scaled before the stack, so the engine keeps its per-task
            # graph edges; the method is told the factor and balances the true gradients.
            losses = torch.stack([self.scaler.scale(loss) for loss in task_losses])
            scale = float(self.scaler.get_scale())
            ctx["loss_scale"] = scale
        else:
            losses = true_losses
        if hasattr(self.model, "loss_terms"):
            total = self.config.epochs * max(len(self.sampler), 1)
            done = self.epoch * len(self.sampler) + self.position
            term = self.model.loss_terms(true_losses, progress=min(done / total, 1.0))
            if term is not None:
                self._backward_term(term * scale, n_local)
        shared = self.shared_params()
        if not any(p.requires_grad for p in shared):
            # Nothing shared to balance (e.g. RCM's frozen filter bank): each task's
            # parameters get their own gradient, which only equal weighting describes.
            if self.method.name != "ew":
                raise ValueError(
                    f"{type(self.model).__name__} has no trainable shared parameter, so "
                    f"{type(self.method).__name__} has nothing to balance; use method 'ew'"
                )
            weights = getattr(self.method, "task_weights", None)
            self._backward_term(
                (losses if weights is None else weights.to(losses) * losses).sum(), n_local
            )
            result = None
        else:
            result = self.method.backward(
                losses, shared_params=shared, features=features, mode=self.config.mode, **ctx
            )
        if not self._method_params_checked and not self.method.needs_meta_step:
            # A method may create its parameters at its first step (RotoGrad without
            # latent_size): an optimizer built before would silently never train them.
            self._check_optimizer_holds(list(self.method.parameters()))
            self._method_params_checked = True
        aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
        if aux is not None:
            self._backward_term(aux * scale, n_local)
        if last_micro:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            if micro_batches > 1:
                # The mean of the micro-batches' directions, as one batch of the union would
                # give for a loss weighting of mean losses.
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(micro_batches)
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            if (
                self.scheduler is not None
                and self.config.scheduler_interval == "step"
                and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            ):
                self.scheduler.step()
            if self.train_loss is not None and hasattr(self.train_loss, "step"):
                self.train_loss.step()
            if self.method.needs_losses_after_step:
                with torch.no_grad():
                    _, _, after = self._forward_losses(inputs, targets)
                self.method.after_step(torch.stack(after), num_samples=n_local)
        if result is not None and "global_losses" in result.extras:
            # Under polytask.distributed: the global batch's losses, the same on every rank.
            reported = result.extras["global_losses"].detach().to(true_losses.dtype)
            if "loss_scale" in ctx:
                reported = reported / ctx["loss_scale"]
        else:
            reported = true_losses.detach()
        return {
            "losses": reported,
            "weights": None if result is None or result.weights is None else result.weights,
            "aux": None if aux is None else float(aux.detach()),
        }

    def _meta_batch(self) -> Any:
        """The next batch of the meta sampler (its own shuffle of the training set)."""
        from torch.utils.data import default_collate

        if self._meta_batches is None:
            self._meta_batches = iter(self.meta_sampler)
        try:
            indices = next(self._meta_batches)
        except StopIteration:
            self._meta_batches = iter(self.meta_sampler)
            indices = next(self._meta_batches)
        return self._to_device(default_collate([self.train_set[i] for i in indices]))

    def _meta_loss(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        with self._autocast():
            outputs = model(inputs)
            return torch.stack([v.float() for v in self.tasks.losses(outputs, targets)])

    def _meta_step(self, inputs: Any, targets: Any) -> dict[str, Any]:
        """The method's meta step on this batch (see :mod:`polytask.methods.meta`)."""
        method: Any = self.method
        if isinstance(self.optimizer, torch.optim.SGD):
            inner: dict[str, Any] = {"inner_optimizer": self.optimizer}
        else:
            # The virtual step is an SGD step; with another optimizer it takes the model's
            # learning rate (MOML's official code does the same with Adam).
            inner = {"inner_lr": float(self.optimizer.param_groups[0]["lr"])}
        if getattr(method, "meta_step_replaces_step", False):
            steps = [(inputs, targets)]
            steps += [self._meta_batch() for _ in range(len(self.tasks) - 1)]
            if not isinstance(self.optimizer, torch.optim.SGD):
                inner = {"inner_optimizer": self.optimizer}
            if method.sync is not None:
                inner["num_samples"] = [_batch_size(batch[0]) for batch in steps]
            method.meta_step(self.model, steps, None, self._meta_loss, **inner)
            with torch.no_grad():
                now = self._meta_loss(self.model, (inputs, targets))
            if method.sync is not None:
                now = method.sync.mean_losses(now, _batch_size(inputs))
            return {"losses": now.detach()}
        val_batch = self._meta_batch()
        if method.sync is not None:
            # This rank's shares of the two global batches.
            inner["num_samples"] = (_batch_size(inputs), _batch_size(val_batch[0]))
        result = method.meta_step(
            self.model, (inputs, targets), val_batch, self._meta_loss, **inner
        )
        return {"losses": None, "weights": result.weights}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics and mean task losses on ``split`` ("val" or "test")."""
        loader = self.eval_loaders[split]
        metrics = SplitMetrics(self.tasks).to(self.device)
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        counts = torch.zeros(len(self.tasks), dtype=torch.float64)
        for batch in loader:
            inputs, targets = self._to_device(batch)
            with self._autocast():
                if self.method.has_task_views:  # the heads read the method's views here too
                    outputs = self._decode(self.model.encode(inputs))
                else:
                    outputs = self.model(inputs)
                losses = self.tasks.losses(outputs, targets)
            # Each batch's mean loss weighted by its size, over the batches that label the
            # task: the split's mean, whatever the batch size (a batch without the task's
            # labels has a loss of 0 that says nothing).
            size = float(_batch_size(inputs))
            present = self._present(targets).double()
            totals += torch.tensor([float(v) for v in losses], dtype=torch.float64) * present * size
            counts += present * size
            metrics.update({k: v.float() for k, v in outputs.items()}, targets)
        self.model.train(was_training)
        if self.method.sync is not None:
            both = self.method.sync.comm.all_reduce(torch.cat([totals, counts]).to(self.device))
            totals, counts = both.cpu().split(len(self.tasks))
        mean = torch.where(counts > 0, totals / counts.clamp_min(1), torch.nan)
        return {"metrics": metrics.compute(), "losses": mean.tolist()}

    def _score(self, val: dict[str, Any]) -> float:
        select = self.config.select
        if select == "loss":
            return float(sum(val["losses"]))
        if select == "delta_m":
            assert self.reference is not None
            return delta_m(val["metrics"], self.reference, self.directions)
        value = val["metrics"][select]  # checked against the metrics in __init__
        return -value if self.directions[select] else value

    def _checkpoint(self) -> None:
        if self.out_dir is None:
            return
        rng: Any = get_rng_state()
        if self.world_size > 1:
            # Each rank draws its own dropout and augmentation: all of them are kept.
            import torch.distributed as dist

            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, rng)
            rng = states
        if not self._writes:
            return
        save_checkpoint(
            self.out_dir / "last.pt",
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "method": self.method.state_dict(),
                "scaler": self.scaler.state_dict(),
                "train_loss": self.train_loss.state_dict()
                if isinstance(self.train_loss, nn.Module)
                else None,
                "sampler": {**self.sampler.state_dict(), "position": self.position},
                "meta_sampler": self.meta_sampler.state_dict(),
                "rng": rng,
                "world_size": self.world_size,
                "step": self.step,
                "epoch": self.epoch,
                "history": self.history,
                "reference": self.reference,
                "latest_val": self.latest_val,
                "epoch_losses": (self._loss_sums, self._loss_count),
                "wall_time": self._wall_before + time.perf_counter() - self._fit_start,
                "epoch_weights": (self._weight_sums, self._weight_count),
            },
        )

    def resume(self) -> bool:
        """Load ``out_dir/last.pt`` if it exists; return whether a run was resumed."""
        if self.out_dir is None or not (self.out_dir / "last.pt").is_file():
            return False
        state = load_checkpoint(self.out_dir / "last.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.scaler.load_state_dict(state["scaler"])
        if isinstance(self.train_loss, nn.Module):
            self.train_loss.load_state_dict(state["train_loss"])
        self.sampler.load_state_dict(state["sampler"])
        self.position = self.sampler.position
        self.meta_sampler.load_state_dict(state["meta_sampler"])
        self._meta_batches = None
        written_by = state.get("world_size", 1)
        if written_by != self.world_size:
            raise ValueError(
                f"{self.out_dir / 'last.pt'} was written by a run on {written_by} process(es); "
                f"resume it on {written_by} (this run has {self.world_size}), or train afresh "
                "in another output folder"
            )
        set_rng_state(state["rng"][self.rank] if self.world_size > 1 else state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history, self.reference = state["history"], state["reference"]
        self.latest_val = state["latest_val"]
        self._loss_sums, self._loss_count = state["epoch_losses"]
        self._wall_before = float(state["wall_time"])
        self._weight_sums, self._weight_count = state["epoch_weights"]
        self.logger.log("resume", step=self.step, epoch=self.epoch)
        return True

    def fit(self, *, resume: bool = False, stop_after_steps: int | None = None) -> TrainResult:
        """Train for ``config.epochs`` epochs (continuing a checkpoint with ``resume``).

        ``stop_after_steps`` stops after that many optimizer steps of this call, leaving the
        checkpoint behind, as a killed run would (the tests use it).
        """
        start = time.perf_counter()
        self._fit_start = start
        resumed = self.resume() if resume else False
        if not resumed and self.step == 0:
            # The run owns the global RNG streams (dropout, augmentation) from here on.
            seed_everything(self._rank_seed(self.config.seed))
        needs_val_first = bool({"val_losses", "kpis"} & set(self.method.needs))
        if self.latest_val is None and (needs_val_first or self.config.select == "delta_m"):
            self.latest_val = self.evaluate("val")
            if self.reference is None and self.config.select == "delta_m":
                self.reference = dict(self.latest_val["metrics"])
                bad = [k for k, v in self.reference.items() if not math.isfinite(v) or v == 0]
                if bad:
                    raise ValueError(
                        f"cannot select on Δm against the first validation scores: {bad} are 0 "
                        "or undefined; pass baselines= or TrainConfig(select='loss')"
                    )
            self.logger.log("eval", split="val", epoch=0, step=self.step, **self.latest_val)
        steps_here = 0
        self.model.train()
        progress = _progress(self.config.progress and self._writes)
        try:
            with progress:
                epochs_bar = progress.add_task(
                    "epochs", total=self.config.epochs, completed=self.epoch
                )
                while self.epoch < self.config.epochs:
                    self._run_epoch(progress, stop_after_steps, steps_here)
                    steps_here = self._steps_here
                    progress.update(epochs_bar, completed=self.epoch)
        except _Interrupt:
            self.logger.log("interrupted", step=self.step, epoch=self.epoch)
        self.logger.close()
        return self._result(self._wall_before + time.perf_counter() - start)

    def _run_epoch(self, progress: Any, stop_after_steps: int | None, steps_here: int) -> None:
        self._steps_here = steps_here
        self.sampler.epoch = self.epoch
        self.sampler.position = self.position
        self._loader_rng.manual_seed(self._rank_seed(self.config.seed * 1_000_003 + self.epoch))
        n_batches = len(self.sampler)
        bar = progress.add_task(f"epoch {self.epoch + 1}", total=n_batches, completed=self.position)
        if self.position == 0:
            self._loss_sums = [0.0] * len(self.tasks)
            self._loss_count = 0
            self._weight_sums, self._weight_count = None, 0
        for batch in self.train_loader:
            # A step closes after `accumulate` micro-batches or at the epoch's last batch.
            index = self.position
            first = index % self.config.accumulate == 0
            last = (index + 1) % self.config.accumulate == 0 or index + 1 == n_batches
            group = index % self.config.accumulate + 1
            out = self._train_step(batch, first, last, group)
            self.position += 1
            self._loss_sums = [a + b for a, b in zip(self._loss_sums, out["losses"].tolist())]
            if out["weights"] is not None:
                w = out["weights"].tolist()
                self._weight_sums = [a + b for a, b in zip(self._weight_sums or [0.0] * len(w), w)]
                self._weight_count += 1
            self._loss_count += 1
            progress.update(bar, advance=1)
            if not last:
                continue
            self._steps_here += 1
            self.logger.log("step", step=self.step, epoch=self.epoch + 1, **out)
            every = self.config.checkpoint_every
            if every and self.step % every == 0:
                self._checkpoint()
            if stop_after_steps is not None and self._steps_here >= stop_after_steps:
                self._checkpoint()
                raise _Interrupt
        progress.remove_task(bar)
        self.position = 0
        self._end_epoch([v / max(self._loss_count, 1) for v in self._loss_sums])

    def _end_epoch(self, train_losses: Sequence[float]) -> None:
        self.epoch += 1
        val = self.evaluate("val")
        self.latest_val = val
        test = self.evaluate("test") if "test" in self.eval_loaders else None
        score = self._score(val)
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau:
            self.scheduler.step(score)  # on the validation selection score, lower is better
        elif self.scheduler is not None and self.config.scheduler_interval == "epoch":
            with warnings.catch_warnings():
                # A run resumed right at an epoch's end steps the scheduler before this
                # process stepped the optimizer; the order of the two is still right.
                warnings.filterwarnings(
                    "ignore", re.escape("Detected call of `lr_scheduler.step()`")
                )
                self.scheduler.step()
        record = {
            "epoch": self.epoch,
            "train_losses": list(train_losses),
            "val": val["metrics"],
            "val_losses": val["losses"],
            "test": {} if test is None else test["metrics"],
            "score": score,
            "weights": None
            if self._weight_sums is None
            else [v / self._weight_count for v in self._weight_sums],
        }
        self.history.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
        self.logger.log("eval", split="val", epoch=self.epoch, step=self.step, **val)
        if test is not None:
            self.logger.log("eval", split="test", epoch=self.epoch, step=self.step, **test)
        self._checkpoint()

    def _result(self, wall: float) -> TrainResult:
        if not self.history:
            return TrainResult(best_epoch=0, val={}, test={}, history=[], wall_time=wall)
        best = min(self.history, key=lambda r: (r["score"], r["epoch"]))
        return TrainResult(
            best_epoch=best["epoch"],
            val=best["val"],
            test=best["test"],
            history=list(self.history),
            wall_time=wall,
        )


@torch.no_grad()
def _broadcast_buffers(comm: Any, buffers: list[Tensor]) -> None:
    """Rank 0's buffers on every rank, one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in buffers:
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for group in by_dtype.values():
        flat = comm.broadcast(torch.cat([b.reshape(-1) for b in group]))
        offset = 0
        for b in group:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
