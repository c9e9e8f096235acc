"""Small multi-target tabular benchmarks from the data files the PyPI package ``river`` ships.

Two of river's offline data sets have several targets per row, one task each:

* ``solar_flare`` (river's ``SolarFlare``; UCI Solar Flare, data2: 1,066 active regions
  observed in 1978 by the Space Environment Services Center, Boulder): 10 attributes, all
  coded categories (UCI), one-hot encoded with the codes the UCI documentation lists; three
  regression tasks, the numbers of C-, M- and X-class flares in the following 24 hours
  (MSE loss, MAE metric). Used as a multi-target regression benchmark by
  Spyromitros-Xioufis, Tsoumakas, Groves & Vlahavas, "Multi-target regression via input
  space expansion: treating targets as inputs", Machine Learning 104, 2016.
* ``yeast`` (river's ``Yeast``, the MULAN version, OpenML 40597): 2,417 genes, 103
  micro-array expression and phylogenetic-profile features, 14 functional classes
  (Elisseeff & Weston, "A kernel method for multi-labelled classification", NeurIPS 2001);
  one binary task per class (binary cross-entropy, accuracy, which averaged over the tasks
  is one minus the Hamming loss the multi-label literature reports). Features are
  standardised with the training split's mean and standard deviation.

Read with Python's ``csv`` from the files in ``river/datasets`` (``solar-flare.csv.zip``,
``yeast.csv.gz``) without importing river, whose import takes seconds; the column names are
checked against the ones river's readers use. Departures: neither source has a validation
split and MULAN's yeast train/test split cannot be recovered from river's file, so both
sets are split at random with ``seed`` into 70% training, 15% validation and 15% test
rows. No paper defines an MLP recipe for them; the networks and recipe below are ours.

Options: ``subset`` (a number of training rows; validation and test shrink in proportion).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from polytask.data._splits import TaskTensors, check_options, disjoint_splits, subset_sizes
from polytask.data.benchmark import Benchmark, Recipe, register
from polytask.errors import DataFormatError, DataNotFoundError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["SETS", "TabularSet", "load", "read_table", "river_data_dir"]


@dataclass(frozen=True)
class TabularSet:
    """One multi-target table: its file, feature columns and targets.

    Attributes:
        file: the file name in ``river/datasets``.
        categorical: ``column -> allowed codes`` (one-hot encoded in this order).
        numeric: columns used as numbers (standardised with training statistics).
        targets: ``column -> task name``.
        kind: ``"regression"`` or ``"binary"``.
    """

    file: str
    categorical: dict[str, tuple[str, ...]]
    numeric: tuple[str, ...]
    targets: dict[str, str]
    kind: str

    @property
    def num_features(self) -> int:
        return sum(len(codes) for codes in self.categorical.values()) + len(self.numeric)


_YEAST_CLASSES = tuple(f"Class{i}" for i in range(1, 15))

SETS: dict[str, TabularSet] = {
    "solar_flare": TabularSet(
        file="solar-flare.csv.zip",
        # The codes of the UCI documentation (flare.names), in its order.
        categorical={
            "zurich-class": ("A", "B", "C", "D", "E", "F", "H"),
            "largest-spot-size": ("X", "R", "S", "A", "H", "K"),
            "spot-distribution": ("X", "O", "I", "C"),
            "activity": ("1", "2"),
            "evolution": ("1", "2", "3"),
            "previous-24h-flare-activity": ("1", "2", "3"),
            "hist-complex": ("1", "2"),
            "hist-complex-this-pass": ("1", "2"),
            "area": ("1", "2"),
            "largest-spot-area": ("1", "2"),
        },
        numeric=(),
        targets={
            "c-class-flares": "c_flares",
            "m-class-flares": "m_flares",
            "x-class-flares": "x_flares",
        },
        kind="regression",
    ),
    "yeast": TabularSet(
        file="yeast.csv.gz",
        categorical={},
        numeric=tuple(f"Att{i}" for i in range(1, 104)),
        targets={c: c.lower() for c in _YEAST_CLASSES},
        kind="binary",
    ),
}

#: Fractions of the rows in validation and test (the rest is training).
HELD_OUT = 0.15


def river_data_dir() -> Path:
    """``river/datasets`` of the installed river package (found without importing it)."""
    spec = importlib.util.find_spec("river")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "the solar_flare and yeast benchmarks read the data files that the PyPI package "
            "river ships: pip install river"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets"


def _read_text(path: Path) -> str:
    """The text of a CSV file, plain, gzipped or the only member of a zip archive."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1:
                raise DataFormatError(f"{path} should hold one CSV file, it holds {names}")
            return archive.read(names[0]).decode("utf-8")
    return path.read_text(encoding="utf-8")


@functools.cache
def read_table(
    name: str, root: str | None = None
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The header and rows (strings) of set ``name``'s CSV file, from ``root`` (default:
    river's installed ``datasets`` folder); cached per process."""
    spec = _set(name)
    path = (Path(root) if root is not None else river_data_dir()) / spec.file
    if not path.is_file():
        raise DataNotFoundError(f"{name}: no file {path}; install river or pass its datasets dir")
    reader = csv.reader(io.StringIO(_read_text(path)))
    header = tuple(next(reader, ()))
    rows = tuple(tuple(row) for row in reader if row)
    wanted = [*spec.categorical, *spec.numeric, *spec.targets]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(f"{path} lacks the column(s) {missing}; its header is {header}")
    bad = [i for i, row in enumerate(rows) if len(row) != len(header)]
    if bad:
        raise DataFormatError(f"{path}: rows {bad[:5]} do not have {len(header)} fields")
    return header, rows


def _set(name: str) -> TabularSet:
    if name not in SETS:
        raise ValueError(f"unknown river set {name!r}; known: {sorted(SETS)}")
    return SETS[name]


def _encode(name: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> np.ndarray:
    """Raw features [N, F] (float64): one-hot categories, then the numeric columns."""
    spec = _set(name)
    col = {c: i for i, c in enumerate(header)}
    parts = []
    for column, codes in spec.categorical.items():
        values = [row[col[column]] for row in rows]
        unknown = sorted(set(values) - set(codes))
        if unknown:
            raise DataFormatError(f"{name}: column {column!r} has codes {unknown}, not {codes}")
        index = {code: j for j, code in enumerate(codes)}
        onehot = np.zeros((len(rows), len(codes)))
        onehot[np.arange(len(rows)), [index[v] for v in values]] = 1.0
        parts.append(onehot)
    if spec.numeric:
        try:
            parts.append(np.array([[float(row[col[c]]) for c in spec.numeric] for row in rows]))
        except ValueError as exc:
            raise DataFormatError(f"{name}: a numeric feature is not a number: {exc}") from None
    return np.concatenate(parts, axis=1)


def _targets(name: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> np.ndarray:
    spec = _set(name)
    col = {c: i for i, c in enumerate(header)}
    values = np.array([[row[col[c]] for c in spec.targets] for row in rows])
    if spec.kind == "binary":
        if not np.isin(values, ("0", "1")).all():
            raise DataFormatError(
                f"{name}: labels must be 0 or 1, found {sorted(set(values.flat))}"
            )
    try:
        return values.astype(np.float64)
    except ValueError as exc:
        raise DataFormatError(f"{name}: a target is not a number: {exc}") from None


def load(
    name: str, seed: int = 0, root: str | None = None, **options: object
) -> dict[str, Dataset]:
    """Train/val/test splits of set ``name``; items ``(features [F] float32, {task: target})``
    with float32 scalar targets (flare counts, or 0/1 labels). Deterministic given ``seed``;
    each split's ``source`` holds the file's row numbers of its items. ``root``: a folder
    with the set's file (default: river's installed ``datasets`` folder)."""
    check_options(name, options, ("subset",))
    header, rows = read_table(name, root)
    x, y = _encode(name, header, rows), _targets(name, header, rows)
    held = round(HELD_OUT * len(rows))
    sizes = subset_sizes(
        {"train": len(rows) - 2 * held, "val": held, "test": held},
        options.get("subset"),  # type: ignore[arg-type]
    )
    splits = disjoint_splits(len(rows), sizes, seed)
    # Standardise the numeric columns with training statistics (a constant column is only
    # centred); the one-hot columns, which come first, keep their 0/1 values.
    first = x.shape[1] - len(_set(name).numeric)
    train = x[splits["train"], first:]
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean[first:] = train.mean(axis=0)
    std[first:] = np.where(train.std(axis=0) > 0, train.std(axis=0), 1.0)
    tasks_ = list(_set(name).targets.values())
    out: dict[str, Dataset] = {}
    for split, idx in splits.items():
        features = torch.from_numpy((x[idx] - mean) / std).float()
        targets = {t: torch.from_numpy(y[idx, k]).float() for k, t in enumerate(tasks_)}
        out[split] = TaskTensors(features, targets, source=idx)
    return out


def tasks(name: str) -> TaskSet:
    spec = _set(name)
    if spec.kind == "binary":
        return TaskSet(
            [Task(t, losses.bce_with_logits, [metrics.Accuracy]) for t in spec.targets.values()]
        )
    return TaskSet(
        [Task(t, losses.mse, [lambda: metrics.MeanError("mae")]) for t in spec.targets.values()]
    )


def model(name: str, arch: str, task_names: Sequence[str]) -> nn.Module:
    """A ReLU MLP shared bottom of 64 units with a 16-unit tower per task, or MMoE with 4
    experts of 16 units (as many hidden units as the bottom) and the same towers."""
    from polytask import archs

    width = _set(name).num_features
    if arch == "shared_bottom":
        return archs.create(
            "shared_bottom", tasks=list(task_names), in_features=width, bottom=[64], tower=[16]
        )
    if arch == "mmoe":
        return archs.create(
            "mmoe",
            tasks=list(task_names),
            in_features=width,
            num_experts=4,
            expert=[16],
            tower=[16],
        )
    raise ValueError(f"unknown architecture {arch!r} for {name}; it has ['shared_bottom', 'mmoe']")


def _register(name: str, summary: str, source: str, batch_size: int) -> Benchmark:
    return register(
        Benchmark(
            name=name,
            summary=summary,
            source=source,
            tasks=functools.partial(tasks, name),
            load=functools.partial(load, name),
            options=("subset",),
            model=functools.partial(model, name),
            archs=("shared_bottom", "mmoe"),
            recipe=Recipe(epochs=100, batch_size=batch_size, optimizer="adam", lr=1e-3),
        )
    )


SOLAR_FLARE = _register(
    "solar_flare",
    "UCI Solar Flare (river): counts of C, M and X flares, 3 regression tasks (CPU, seconds)",
    "UCI Solar Flare data2 as shipped by river; Spyromitros-Xioufis et al., Machine Learning "
    "104, 2016 (multi-target regression benchmark)",
    batch_size=32,
)
YEAST = _register(
    "yeast",
    "Yeast gene functions (river/MULAN): 14 binary tasks (CPU, seconds)",
    "Elisseeff & Weston, A kernel method for multi-labelled classification, NeurIPS 2001 "
    "(MULAN's version, as shipped by river)",
    batch_size=64,
)
