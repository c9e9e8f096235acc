"""Task scheduling for multi-input multi-task learning: which task(s) each step trains on.

In multi-input MTL every task has its own data set, so a step holds a batch of one task (or of
a few tasks) rather than one batch labelled for all of them. :class:`MultiTaskLoader` turns one
``torch.utils.data.DataLoader`` per task into a stream of steps, choosing the task(s) of each
step with a sampler:

* ``"round_robin"``: tasks in turn, 0, 1, ..., K-1, 0, ... (the cycle runs on across epochs).
* ``"uniform"``: p_k = 1 / K.
* ``"proportional"``: p_k ∝ n_k, the number of training examples of task k.
* ``"temperature"``: p_k ∝ n_k^(1/T); T = 1 is ``"proportional"``, T -> inf ``"uniform"``.
  The default T = 2 is the square-root sampling of Stickland & Murray (below).
* ``"annealed"``: p_k ∝ n_k^alpha with alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch e = 1..E of
  E epochs: proportional at first, nearly uniform at the end. Stickland & Murray, "BERT and PALs:
  Projected Attention Layers for Efficient Adaptation in Multi-Task Learning", ICML 2019, §4.

**Epochs.** An epoch is ``steps_per_epoch`` steps; by default ceil(sum_k len(loader_k) / m) with
m tasks per step, i.e. as many task batches as one pass over every task's loader, whatever the
sampler (so epochs of different samplers cost the same compute; a task drawn more often than its
share starts further passes over its data, one drawn less often does not finish its pass).
Iterating the loader yields the rest of the current epoch, then moves to the next epoch, so
``for epoch in range(E): for task, batch in loader: ...`` runs E epochs; ``len(loader)`` is
``steps_per_epoch``.

**Reproducibility.** Tasks are drawn from the loader's own ``torch.Generator`` (seeded by
``seed``); the global RNG is never used. Pass p of task k reseeds that task's ``DataLoader``
generator with a seed derived from (seed, k, p), so the order of every task's data depends only
on ``seed``, not on how often the other tasks were drawn.

**Checkpoints.** :meth:`MultiTaskLoader.state_dict` records the epoch, the step in it, the
sampler's generator and, per task, its pass and the batches consumed in it;
:meth:`~MultiTaskLoader.load_state_dict` restores them, and the restored loader yields exactly
the remaining (task, batch) sequence of the uninterrupted one. A task's iterator is rebuilt by
reseeding its pass and skipping the batches already consumed in it, so resuming re-reads (and
discards) at most one partial pass per task.

Example (one task per step, with a balancing method that accepts partial steps)::

    loader = MultiTaskLoader.from_datasets(
        {"seg": seg_data, "depth": depth_data}, batch_size=8, sampler="annealed", num_epochs=E
    )
    method = polytask.methods.create("upgrad", num_tasks=2)
    for epoch in range(E):
        for task, (x, y) in loader:
            optimizer.zero_grad()
            features = model.encoder(x)
            loss = criteria[task](model.heads[task](features), y)
            losses = torch.stack([loss if t == task else loss.new_zeros(()) for t in loader.tasks])
            method.backward(losses, shared_params=shared, present=loader.present(task))
            optimizer.step()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from polytask.errors import InvalidHyperparameterError

__all__ = ["SAMPLERS", "MultiTaskLoader", "MultiTaskStep", "annealed_alpha"]

SAMPLERS = ("round_robin", "uniform", "proportional", "temperature", "annealed")
_SIZED = ("proportional", "temperature", "annealed")


@dataclass(frozen=True)
class MultiTaskStep:
    """One step holding the batches of several tasks (``tasks_per_step > 1``).

    Attributes:
        tasks: the step's tasks, in the loader's task order.
        batches: each of these tasks' batch.
        present: BoolTensor[K] marking the step's tasks in the loader's task order; pass it to
            ``method.backward(..., present=step.present)`` with placeholder losses for the
            other tasks.
    """

    tasks: tuple[Hashable, ...]
    batches: dict[Hashable, Any]
    present: Tensor


def annealed_alpha(epoch: int, num_epochs: int) -> float:
    """alpha = 1 - 0.8 (e - 1) / (E - 1) of Stickland & Murray (ICML 2019), e = ``epoch`` + 1.

    ``epoch`` is 0-based; with ``num_epochs`` = 1 alpha is 1 (proportional sampling).
    """
    if not 0 <= epoch < num_epochs:
        raise InvalidHyperparameterError(
            f"epoch={epoch} is outside the annealing schedule of num_epochs={num_epochs} "
            "(0-based); build the loader with the number of epochs you train for"
        )
    if num_epochs == 1:
        return 1.0
    return 1.0 - 0.8 * epoch / (num_epochs - 1)


def _derived_seed(seed: int, task: int, epoch_of_task: int) -> int:
    # SeedSequence mixes the three integers well, so nearby (task, pass) get unrelated streams.
    state = np.random.SeedSequence([seed, task, epoch_of_task]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _check_loader(name: Hashable, loader: Any) -> DataLoader:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"task {name!r}: expected a torch.utils.data.DataLoader, got {type(loader).__name__}; "
            "use MultiTaskLoader.from_datasets for datasets"
        )
    if loader.generator is None:
        raise InvalidHyperparameterError(
            f"task {name!r}: its DataLoader has no generator, so its shuffling and worker seeds "
            "come from the global RNG and cannot be reseeded; build it with "
            "DataLoader(..., generator=torch.Generator())"
        )
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    random_samplers = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    if isinstance(sampler, random_samplers) and sampler.generator is not loader.generator:
        raise InvalidHyperparameterError(
            f"task {name!r}: its {type(sampler).__name__} draws from another generator than the "
            "DataLoader's, so the scheduler cannot reseed it; give both the same generator"
        )
    return loader


class MultiTaskLoader:
    """Steps of ``(task, batch)`` drawn from per-task data loaders, reproducible and resumable.

    Args:
        loaders: one ``DataLoader`` per task, as a mapping {task name: loader} or a sequence
            (tasks named 0..K-1). Each must have its own ``generator`` (the scheduler reseeds
            it at every pass over the task's data).
        sampler: one of :data:`SAMPLERS` (see the module docstring); default ``"proportional"``.
        temperature: T of the ``"temperature"`` sampler; default 2 (square-root sampling,
            Stickland & Murray 2019).
        num_epochs: E, required by the ``"annealed"`` sampler (its schedule spans E epochs).
        steps_per_epoch: steps per epoch; default ceil(sum_k len(loader_k) / tasks_per_step).
        tasks_per_step: m, the number of distinct tasks in each step; default 1. With m = 1 the
            loader yields ``(task, batch)``; with m > 1 it yields :class:`MultiTaskStep`
            (random samplers draw the m tasks one after the other without replacement,
            each in proportion to p among the tasks not drawn yet, as ``torch.multinomial``).
        seed: seed of the task sampler and of every task's data order; default 0.
        sizes: n_k for the size-based samplers; default ``len(loader_k.dataset)``.
    """

    def __init__(
        self,
        loaders: Mapping[Hashable, DataLoader] | Sequence[DataLoader],
        *,
        sampler: str = "proportional",
        temperature: float = 2.0,
        num_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        tasks_per_step: int = 1,
        seed: int = 0,
        sizes: Sequence[int] | None = None,
    ) -> None:
        if isinstance(loaders, Mapping):
            names, values = list(loaders.keys()), list(loaders.values())
        elif isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)):
            names, values = list(range(len(loaders))), list(loaders)
        else:
            raise TypeError(
                f"loaders must be a mapping {{task: DataLoader}} or a sequence of DataLoaders, "
                f"got {type(loaders).__name__}"
            )
        if not values:
            raise InvalidHyperparameterError("loaders is empty; give one DataLoader per task")
        self.tasks: tuple[Hashable, ...] = tuple(names)
        self.loaders = [_check_loader(n, v) for n, v in zip(names, values)]
        k = len(self.loaders)
        if sampler not in SAMPLERS:
            raise InvalidHyperparameterError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        self.sampler = sampler
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise InvalidHyperparameterError(f"temperature={temperature!r} must be a number > 0")
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidHyperparameterError(f"temperature={temperature!r} must be finite and > 0")
        self.temperature = float(temperature)
        if sampler == "annealed" and num_epochs is None:
            raise InvalidHyperparameterError(
                "sampler='annealed' needs num_epochs=E, the number of epochs its schedule spans"
            )
        if num_epochs is not None and (not _positive_int(num_epochs)):
            raise InvalidHyperparameterError(f"num_epochs={num_epochs!r} must be an integer >= 1")
        self.num_epochs = num_epochs
        if not _positive_int(tasks_per_step) or tasks_per_step > k:
            raise InvalidHyperparameterError(
                f"tasks_per_step={tasks_per_step!r} must be an integer in [1, {k}] (the steps "
                "hold distinct tasks)"
            )
        self.tasks_per_step = tasks_per_step
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidHyperparameterError(f"seed={seed!r} must be a non-negative integer")
        self.seed = seed
        self.sizes = self._sizes(sizes)
        for name, loader in zip(self.tasks, self.loaders):
            if _length(loader) == 0:
                raise InvalidHyperparameterError(f"task {name!r}: its DataLoader yields no batch")
        if steps_per_epoch is None:
            lengths = [_length(loader) for loader in self.loaders]
            missing = [n for n, length in zip(self.tasks, lengths) if length is None]
            if missing:
                raise InvalidHyperparameterError(
                    f"the loaders of tasks {missing} have no length (iterable datasets); "
                    "pass steps_per_epoch"
                )
            steps_per_epoch = math.ceil(sum(lengths) / tasks_per_step)  # type: ignore[arg-type]
        if not _positive_int(steps_per_epoch):
            raise InvalidHyperparameterError(
                f"steps_per_epoch={steps_per_epoch!r} must be an integer >= 1"
            )
        self.steps_per_epoch = steps_per_epoch
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch = 0
        self._step = 0
        self._cursor = 0
        self._passes = [0] * k
        self._consumed = [0] * k
        self._iterators: list[Iterator | None] = [None] * k

    @classmethod
    def from_datasets(
        cls,
        datasets: Mapping[Hashable, Dataset] | Sequence[Dataset],
        *,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> MultiTaskLoader:
        """One ``DataLoader`` per dataset (same batch size, own generator), then the loader.

        ``kwargs`` are :class:`MultiTaskLoader`'s (sampler, seed, ...).
        """

        def loader(ds: Dataset) -> DataLoader:
            return DataLoader(
                ds,
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                collate_fn=collate_fn,
                num_workers=num_workers,
                generator=torch.Generator(),
            )

        if isinstance(datasets, Mapping):
            return cls({name: loader(ds) for name, ds in datasets.items()}, **kwargs)
        return cls([loader(ds) for ds in datasets], **kwargs)

    def _sizes(self, sizes: Sequence[int] | None) -> list[int] | None:
        if sizes is not None:
            values = list(sizes)
            if len(values) != len(self.loaders) or not all(_positive_int(v) for v in values):
                raise InvalidHyperparameterError(
                    f"sizes={values!r} must hold {len(self.loaders)} integers >= 1 (one per task)"
                )
            return values
        out = []
        for name, loader in zip(self.tasks, self.loaders):
            try:
                n = len(loader.dataset)  # type: ignore[arg-type]
            except TypeError:
                if self.sampler in _SIZED:
                    raise InvalidHyperparameterError(
                        f"sampler={self.sampler!r} needs each task's data-set size, and task "
                        f"{name!r}'s dataset has no len(); pass sizes=[n_1, ..., n_K]"
                    ) from None
                return None
            if n < 1 and self.sampler in _SIZED:
                raise InvalidHyperparameterError(f"task {name!r}: its dataset is empty")
            out.append(n)
        return out

    # -- the schedule ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch (0-based): the one the next step belongs to."""
        return self._epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def present(self, tasks: Hashable | Iterable[Hashable]) -> Tensor:
        """BoolTensor[K] marking ``tasks`` (a task name or several), in the loader's task
        order: the ``present=`` of ``method.backward`` for a step holding these tasks."""
        names = [tasks] if tasks in self.tasks else list(tasks)  # type: ignore[call-overload]
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; the loader's tasks are {list(self.tasks)}")
        return torch.tensor([t in names for t in self.tasks], dtype=torch.bool)

    def probabilities(self, epoch: int | None = None) -> Tensor:
        """The sampler's task probabilities p [K] in ``epoch`` (default: the current one)."""
        k = len(self.loaders)
        if self.sampler in ("round_robin", "uniform"):
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        assert self.sizes is not None
        n = torch.tensor(self.sizes, dtype=torch.float64)
        if self.sampler == "proportional":
            alpha = 1.0
        elif self.sampler == "temperature":
            alpha = 1.0 / self.temperature
        else:
            assert self.num_epochs is not None
            alpha = annealed_alpha(self._epoch if epoch is None else epoch, self.num_epochs)
        # n^alpha through logs, normalised by the largest term: no overflow for large n.
        logits = alpha * n.log()
        p = (logits - logits.max()).exp()
        return p / p.sum()

    def _draw(self) -> list[int]:
        k, m = len(self.loaders), self.tasks_per_step
        if self.sampler == "round_robin":
            tasks = [(self._cursor + j) % k for j in range(m)]
            self._cursor = (self._cursor + m) % k
        else:
            p = self.probabilities()
            tasks = torch.multinomial(p, m, replacement=False, generator=self._generator).tolist()
        return sorted(tasks)

    def _start_pass(self, k: int) -> Iterator:
        loader = self.loaders[k]
        loader.generator.manual_seed(_derived_seed(self.seed, k, self._passes[k]))
        iterator = iter(loader)
        for _ in range(self._consumed[k]):
            next(iterator)
        self._iterators[k] = iterator
        return iterator

    def _next_batch(self, k: int) -> Any:
        iterator = self._iterators[k] or self._start_pass(k)
        try:
            batch = next(iterator)
        except StopIteration:
            self._passes[k] += 1
            self._consumed[k] = 0
            batch = next(self._start_pass(k))
        self._consumed[k] += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        if self.sampler == "annealed":
            assert self.num_epochs is not None
            annealed_alpha(self._epoch, self.num_epochs)  # refuses epochs beyond the schedule
        while self._step < self.steps_per_epoch:
            tasks = self._draw()
            batches = {self.tasks[t]: self._next_batch(t) for t in tasks}
            # Counted before the yield: a state_dict taken while the caller holds this step
            # resumes after it.
            self._step += 1
            if self.tasks_per_step == 1:
                ((name, batch),) = batches.items()
                yield name, batch
            else:
                yield MultiTaskStep(tuple(batches), batches, self.present(batches))
        self._epoch += 1
        self._step = 0

    # -- checkpoints ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "sampler": self.sampler,
            "temperature": self.temperature,
            "num_epochs": self.num_epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "tasks_per_step": self.tasks_per_step,
            "seed": self.seed,
            "sizes": self.sizes,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the schedule (and the configuration it belongs to)."""
        return {
            "config": self._config(),
            "epoch": self._epoch,
            "step": self._step,
            "cursor": self._cursor,
            "generator": self._generator.get_state(),
            "passes": list(self._passes),
            "consumed": list(self._consumed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` of an identically built loader."""
        mine = self._config()
        theirs = dict(state["config"])
        diff = sorted(key for key in mine if mine[key] != theirs.get(key))
        if diff:
            raise ValueError(
                "the checkpoint belongs to a loader built differently: "
                + ", ".join(
                    f"{key}={theirs.get(key)!r} (this loader: {mine[key]!r})" for key in diff
                )
                + "; build the loader with the checkpoint's settings"
            )
        self._epoch = int(state["epoch"])
        self._step = int(state["step"])
        self._cursor = int(state["cursor"])
        self._generator.set_state(state["generator"])
        self._passes = [int(v) for v in state["passes"]]
        self._consumed = [int(v) for v in state["consumed"]]
        self._iterators = [None] * len(self.loaders)


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _length(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
