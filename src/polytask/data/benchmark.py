"""Benchmarks: a data set, its tasks and metrics, the standard models and training recipe.

A :class:`Benchmark` is everything ``polytask run NAME`` needs: the splits (``load``), the
task specs (``tasks``), a model per architecture name (``model``), and the recipe of the
paper that defined the setting (:class:`Recipe`). Benchmarks register by name in
:data:`BENCHMARKS`; the modules that define them are imported on first use of the registry.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from polytask.errors import UnknownNameError
from polytask.registry import Registry
from polytask.tasks import TaskSet

__all__ = ["BENCHMARKS", "Benchmark", "Recipe", "available", "get", "register"]


class UnknownBenchmarkError(UnknownNameError):
    """``polytask.data.benchmark.get`` was given a name that is not registered."""


@dataclass(frozen=True)
class Recipe:
    """A training recipe. Every field can be overridden (``polytask run --set epochs=3``).

    Attributes:
        epochs, batch_size, eval_batch_size: as in :class:`polytask.train.TrainConfig`.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; ``lr``, ``weight_decay`` and
            ``momentum`` (SGD) its settings.
        scheduler: ``None``, ``"step"`` (``step_size`` epochs, ``gamma``), ``"cosine"``,
            ``"poly"`` (lr * (1 - epoch / epochs) ** ``poly_power``, the schedule of DeepLab
            and of Vandenhende et al.'s PASCAL-Context and NYUD recipes) or ``"plateau"``
            (:class:`torch.optim.lr_scheduler.ReduceLROnPlateau` in mode "min": the lr is
            multiplied by ``plateau_factor`` after ``plateau_patience`` epochs without a
            lower validation score, not below ``min_lr``; its ``step`` takes that score).
        mode: ``"params"`` or ``"features"`` for the gradient methods.
        select: model selection on validation (see :class:`polytask.train.TrainConfig`).
        precision, accumulate, grad_clip, scheduler_interval, checkpoint_every, num_workers:
            as in :class:`polytask.train.TrainConfig`.
    """

    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str | None = None
    step_size: int = 10
    gamma: float = 0.5
    poly_power: float = 0.9
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    min_lr: float = 0.0
    mode: str = "params"
    select: str = "delta_m"
    precision: str = "fp32"
    accumulate: int = 1
    grad_clip: float | None = None
    scheduler_interval: str = "epoch"
    checkpoint_every: int | None = None
    num_workers: int = 0

    def override(self, values: Mapping[str, Any]) -> Recipe:
        """A copy with ``values`` applied; an unknown key, a wrong type or a value outside a
        field's choices names itself."""
        known = {f.name: f for f in fields(self)}
        out = {}
        for key, value in values.items():
            if key not in known:
                raise KeyError(f"unknown recipe key {key!r}; the recipe has {sorted(known)}")
            value = _coerce(key, value, _FIELD_TYPES[key])
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ValueError(f"recipe key {key!r} is {value!r}; choose one of {_CHOICES[key]}")
            out[key] = value
        return replace(self, **out)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        params = list(params)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        raise ValueError(f"optimizer={self.optimizer!r} must be 'adam', 'adamw' or 'sgd'")

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        if self.scheduler is None:
            return None
        if self.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, self.step_size, gamma=self.gamma)
        if self.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        if self.scheduler == "poly":
            epochs, power = self.epochs, self.poly_power
            # Clamped at 0 so that stepping past the last epoch cannot raise a negative
            # number to a fractional power.
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: max(0.0, 1.0 - epoch / epochs) ** power
            )
        if self.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=self.plateau_factor,
                patience=self.plateau_patience,
                min_lr=self.min_lr,
            )
        raise ValueError(
            f"scheduler={self.scheduler!r} must be None, 'step', 'cosine', 'poly' or 'plateau'"
        )


#: Each recipe field's declared type (``int | None`` and the like).
_FIELD_TYPES = typing.get_type_hints(Recipe)
#: Fields whose value is one of a few names.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "scheduler": (None, "step", "cosine", "poly", "plateau"),
    "mode": ("params", "features"),
    "precision": ("fp32", "bf16", "fp16"),
    "scheduler_interval": ("epoch", "step"),
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's declared type (from a CLI string or a TOML value)."""
    args = typing.get_args(annotation) or (annotation,)
    nullable = type(None) in args
    (base,) = [a for a in args if a is not type(None)]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if nullable:
            return None
        raise TypeError(f"recipe key {key!r} expects {base.__name__}, not None")
    if isinstance(value, str) and base is not str:
        text = value.strip()
        try:
            if base is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            return base(text)
        except ValueError:
            raise TypeError(f"recipe key {key!r} expects {base.__name__}, got {value!r}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or isinstance(value, bool) != (base is bool):
        raise TypeError(
            f"recipe key {key!r} expects {base.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


@dataclass(frozen=True)
class Benchmark:
    """A benchmark definition.

    Attributes:
        name: registry name (``polytask run NAME``).
        summary: one line for ``polytask list benchmarks``.
        source: the paper(s) the data, tasks and recipe come from.
        tasks: builds the :class:`~polytask.tasks.TaskSet`.
        load: ``load(seed=..., root=..., **options) -> {"train", "val", "test": Dataset}``.
        model: ``model(arch, task_names) -> nn.Module`` returning ``{task: output}``; with a
            single task name it is the single-task baseline network.
        archs: architecture names ``model`` accepts; the first is the default.
        recipe: the standard training recipe.
        needs_root: whether the data must be on disk (``--root``), or ships with a package.
        options: the data options ``load`` accepts (``polytask run --data KEY=VALUE``, a
            sweep's ``[data]`` table), checked before anything trains.
    """

    name: str
    summary: str
    source: str
    tasks: Callable[[], TaskSet]
    load: Callable[..., dict[str, Dataset]]
    model: Callable[[str, Sequence[str]], nn.Module]
    archs: tuple[str, ...]
    recipe: Recipe = field(default_factory=Recipe)
    needs_root: bool = False
    options: tuple[str, ...] = ()

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` naming any data option that ``load`` does not accept."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepts = sorted(self.options) or "none"
            raise ValueError(f"unknown {self.name} data option(s) {unknown}; it accepts {accepts}")

    def check_arch(self, arch: str | None) -> str:
        if arch is None:
            return self.archs[0]
        if arch not in self.archs:
            raise ValueError(
                f"benchmark {self.name!r} has no architecture {arch!r}; it has {list(self.archs)}"
            )
        return arch


BENCHMARKS: Registry[Benchmark] = Registry("benchmark", UnknownBenchmarkError)

#: Modules that define benchmarks, imported when the registry is first used.
_MODULES = (
    "polytask.data.synthetic_mmoe",
    "polytask.data.census_benchmark",
    "polytask.data.nyuv2",
    "polytask.data.cityscapes",
    "polytask.data.celeba",
    "polytask.data.office",
    "polytask.data.aliexpress",
    "polytask.data.multi_mnist",
    "polytask.data.qm9",
    "polytask.data.river_sets",
    "polytask.data.pascal_context",
)
_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        # Marked loaded only once every module imported: a failing import raises again on
        # the next use instead of leaving a silently half-filled registry.
        for module in _MODULES:
            importlib.import_module(module)
        _loaded = True


def options_of(loader: Callable[..., Any], *, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The keyword options of a data loader function (not ``root``, ``seed`` or ``exclude``)."""
    skip = {"root", "seed", *exclude}
    return tuple(
        name
        for name, p in inspect.signature(loader).parameters.items()
        if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS.register(benchmark.name)(benchmark)
    return benchmark


def available() -> list[str]:
    _load_all()
    return BENCHMARKS.available()


def get(name: str) -> Benchmark:
    _load_all()
    return BENCHMARKS.get(name)
