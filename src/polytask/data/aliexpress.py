"""AliExpress: click-through (CTR) and click-through-and-conversion (CTCVR) prediction.

The data: search logs of AliExpress in four countries (Netherlands, Spain, France, United
States), released with Li, Chen, Wang, Zhang, Huang & Zhang, "Improving Multi-Scenario
Learning to Rank in E-commerce by Exploiting Task Relationships in the Label Space", CIKM
2020. As a multi-task benchmark: MTReclib (GitHub easezyc/Multitask-Recommendation-Library,
by Y. Zhu et al.), whose preprocessed CSVs (``data/preprocess.py``) this module reads:
``<root>/AliExpress_<CC>/{train,test}.csv``, CC in NL, ES, FR, US, each with a header and the
columns

* ``search_id`` (not an input: MTReclib drops the first column),
* ``categorical_1`` .. ``categorical_16``: integer ids (embedded),
* ``numerical_1`` .. ``numerical_63``: real features,
* ``click``, ``conversion``: 0 / 1; ``conversion`` is 1 only after a click, so it is the
  click-and-conversion label (CTCVR).

Tasks: ``ctr`` (label ``click``) and ``ctcvr`` (label ``conversion``), binary cross-entropy on
a logit, AUC (MTReclib reports AUC and log-loss per task).

An item is ``((categorical [16] int64, numerical [63] float32), {"ctr": 0-d float32,
"ctcvr": 0-d float32})``.

Splits: ``test`` is ``test.csv`` (the release's test part); ``val`` is a random
``val_fraction`` (default 10%) of ``train.csv``'s rows drawn with ``data_seed``, the rest is
``train``. MTReclib has no validation set (it early-stops on the test AUC).

Model and recipe (MTReclib ``main.py``, "for fair comparisons ... equally for all models"):
every categorical field embedded in 128 dimensions (one table with per-field offsets, Xavier
uniform), the numerical vector mapped by one Linear(63, 128), the 17 embeddings concatenated;
Shared-Bottom: a bottom MLP (512, 256) and per-task towers (128, 64) then a logit, each
hidden layer Linear-BN-ReLU-Dropout(0.2); MMoE and OMoE: 8 experts shaped as that bottom
MLP, softmax gates on the embeddings, the same towers. Adam, lr 1e-3, weight decay 1e-6,
batch size 2048, 50 epochs (MTReclib stops early after 2 epochs without a better AUC;
here the trainer's validation-based selection picks the epoch).

Departure: MTReclib sizes the embedding tables from the training file alone (max id + 1), so
a test id beyond it would index out of range; here the sizes cover both files' ids (label-free
information). The model needs those sizes: :func:`load_aliexpress` returns them
(``Splits.field_dims``) and :func:`model` takes them; the registered benchmark's model uses
the sizes of the data its ``load`` read last in this process (the runner always loads first).

Get the data from MTReclib's project page
(https://github.com/easezyc/Multitask-Recommendation-Library, "Processed_dataset"; or the
original at Tianchi, dataset 74690, then its ``data/preprocess.py``) so that
``<root>/AliExpress_NL/train.csv`` exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polytask.archs.base import MultiTaskModel
from polytask.data._files import check_root, holdout, require
from polytask.data.benchmark import Benchmark, Recipe, options_of, register
from polytask.errors import DataFormatError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = [
    "COLUMNS",
    "COUNTRIES",
    "SOURCE",
    "AliExpress",
    "AliExpressEmbedding",
    "EmbeddedInputs",
    "Splits",
    "load_aliexpress",
    "model",
    "read_csv",
    "tasks",
]

COUNTRIES = ("NL", "ES", "FR", "US")
NUM_CATEGORICAL = 16
NUM_NUMERICAL = 63
COLUMNS: tuple[str, ...] = (
    "search_id",
    *(f"categorical_{i}" for i in range(1, NUM_CATEGORICAL + 1)),
    *(f"numerical_{i}" for i in range(1, NUM_NUMERICAL + 1)),
    "click",
    "conversion",
)
TASKS = ("ctr", "ctcvr")
ARCHS = ("shared_bottom", "mmoe", "omoe")
SOURCE = (
    "Get the AliExpress CSVs preprocessed by MTReclib from its project page "
    "https://github.com/easezyc/Multitask-Recommendation-Library ('Processed_dataset'; or "
    "the original from Tianchi, dataset 74690, then its data/preprocess.py) so that "
    "<root>/AliExpress_<CC>/train.csv and test.csv exist (CC: NL, ES, FR or US)."
)
_NAME = "AliExpress"
_CHUNK = 200_000


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(categorical [N, 16] int64, numerical [N, 63] float32, labels [N, 2] float32)`` of
    one MTReclib CSV (header checked; ``search_id`` dropped); read in chunks of rows."""
    with open(path, encoding="utf-8") as fh:
        header = tuple(fh.readline().strip().split(","))
        if header != COLUMNS:
            raise DataFormatError(
                f"{path}: the header must be MTReclib's {len(COLUMNS)} columns search_id, "
                f"categorical_1..16, numerical_1..63, click, conversion; got {len(header)} "
                f"columns starting {header[:3]}"
            )
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        first_line = 2
        while True:
            lines = list(itertools.islice(fh, _CHUNK))
            if not lines:
                break
            try:
                block = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
            except ValueError as exc:
                raise DataFormatError(
                    f"{path}, lines {first_line}..{first_line + len(lines) - 1}: {exc}"
                ) from None
            if block.shape[1] != len(COLUMNS):
                raise DataFormatError(
                    f"{path}: rows have {block.shape[1]} fields, expected {len(COLUMNS)}"
                )
            cat = block[:, 1 : 1 + NUM_CATEGORICAL]
            if (cat < 0).any() or (cat != np.round(cat)).any():
                raise DataFormatError(f"{path}: categorical ids must be integers >= 0")
            labels = block[:, -2:]
            if not np.isin(labels, (0.0, 1.0)).all():
                raise DataFormatError(f"{path}: click and conversion must be 0 or 1")
            if (labels[:, 1] > labels[:, 0]).any():
                raise DataFormatError(f"{path}: a row has conversion 1 without a click")
            parts.append(
                (
                    cat.astype(np.int64),
                    block[:, 1 + NUM_CATEGORICAL : -2].astype(np.float32),
                    labels.astype(np.float32),
                )
            )
            first_line += len(lines)
    if not parts:
        raise DataFormatError(f"{path} has a header but no rows")
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


class AliExpress(Dataset):
    """Rows of one split: items ``((categorical, numerical), {"ctr", "ctcvr"})``."""

    def __init__(self, categorical: Tensor, numerical: Tensor, labels: Tensor) -> None:
        self.categorical, self.numerical, self.labels = categorical, numerical, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        y = self.labels[i]
        return (self.categorical[i], self.numerical[i]), {"ctr": y[0], "ctcvr": y[1]}


@dataclass(frozen=True)
class Splits:
    """The three splits and the embedding table size of each categorical field."""

    train: AliExpress
    val: AliExpress
    test: AliExpress
    field_dims: tuple[int, ...]

    def as_dict(self) -> dict[str, Dataset]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _country_folder(root: str | Path | None, country: str) -> Path:
    if country not in COUNTRIES:
        raise ValueError(f"country={country!r} must be one of {list(COUNTRIES)}")
    base = check_root(root, _NAME, SOURCE)
    if base.name == f"AliExpress_{country}":
        return base
    return require(base / f"AliExpress_{country}", _NAME, SOURCE, folder=True)


def load_aliexpress(
    root: str | Path | None,
    country: str = "NL",
    *,
    val_fraction: float = 0.1,
    data_seed: int = 0,
) -> Splits:
    """MTReclib's AliExpress CSVs of ``country`` under ``root`` (the folder holding
    ``AliExpress_<CC>/``, or that folder itself), split as in the module docstring."""
    folder = _country_folder(root, country)
    train = read_csv(require(folder / "train.csv", _NAME, SOURCE))
    test = read_csv(require(folder / "test.csv", _NAME, SOURCE))
    field_dims = tuple(int(v) + 1 for v in np.maximum(train[0].max(0), test[0].max(0)))
    kept, held = holdout(len(train[2]), val_fraction, data_seed)

    def subset(arrays: tuple[np.ndarray, ...], rows: np.ndarray | None = None) -> AliExpress:
        tensors = [torch.from_numpy(a if rows is None else a[rows]) for a in arrays]
        return AliExpress(*tensors)

    splits = Splits(subset(train, kept), subset(train, held), subset(test), field_dims)
    _LAST_FIELD_DIMS[:] = [field_dims]
    return splits


def tasks() -> TaskSet:
    """CTR and CTCVR: binary cross-entropy on a logit, AUC."""
    return TaskSet([Task(t, losses.bce_with_logits, [metrics.AUC]) for t in TASKS])


class AliExpressEmbedding(nn.Module):
    """MTReclib's input layer: one embedding table for all categorical fields (field f's id
    v is row offset_f + v; Xavier-uniform), the numerical vector through Linear(63, dim);
    output the 17 concatenated embeddings [B, 17 dim]."""

    def __init__(self, field_dims: Sequence[int], dim: int = 128) -> None:
        super().__init__()
        dims = [int(d) for d in field_dims]
        if len(dims) != NUM_CATEGORICAL or min(dims) < 1:
            raise ValueError(f"field_dims={dims} must be {NUM_CATEGORICAL} positive table sizes")
        self.embedding = nn.Embedding(sum(dims), dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        offsets = torch.tensor([0, *np.cumsum(dims)[:-1].tolist()], dtype=torch.int64)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("sizes", torch.tensor(dims, dtype=torch.int64), persistent=False)
        self.numerical = nn.Linear(NUM_NUMERICAL, dim)
        self.out_features = (NUM_CATEGORICAL + 1) * dim

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        categorical, numerical = inputs
        if bool((categorical >= self.sizes).any()) or bool((categorical < 0).any()):
            raise ValueError(
                "a categorical id is outside its field's embedding table (sizes "
                f"{self.sizes.tolist()}); build the model with the field_dims of this data"
            )
        cat = self.embedding(categorical + self.offsets)
        num = self.numerical(numerical).unsqueeze(1)
        return torch.cat([cat, num], dim=1).flatten(1)


class EmbeddedInputs(MultiTaskModel):
    """A multi-task model ``inner`` read through an input layer: ``inner(embed(x))``.

    For the expert architectures of :mod:`polytask.archs.experts`, which take flat feature
    vectors: ``embed`` (shared) turns the raw inputs into one. The shared representation,
    the task parameters and the paper are ``inner``'s."""

    def __init__(self, embed: nn.Module, inner: MultiTaskModel) -> None:
        super().__init__(inner.tasks)
        self.embed = embed
        self.inner = inner
        self.paper = inner.paper  # type: ignore[misc]
        self.has_shared_representation = inner.has_shared_representation  # type: ignore[misc]

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        return self.inner(self.embed(x), task)

    def encode(self, x: Any) -> Tensor:
        return self.inner.encode(self.embed(x))

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        return self.inner.decode(features, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.inner.task_parameters(task)


#: The field sizes of the data the last :func:`load_aliexpress` read (see the docstring).
_LAST_FIELD_DIMS: list[tuple[int, ...]] = []


def model(
    arch: str,
    task_names: Sequence[str],
    *,
    field_dims: Sequence[int] | None = None,
    embed_dim: int = 128,
    bottom: Sequence[int] = (512, 256),
    tower: Sequence[int] = (128, 64),
    dropout: float = 0.2,
    num_experts: int = 8,
) -> nn.Module:
    """MTReclib's networks (``main.py``'s ``get_model``): ``"shared_bottom"`` (see the module
    docstring), ``"mmoe"`` and ``"omoe"`` (``num_experts`` experts shaped as the bottom MLP,
    softmax gates on the embeddings, the same towers; :mod:`polytask.archs.experts` read
    through :class:`EmbeddedInputs`). ``field_dims`` default: those of the last loaded data."""
    from polytask import archs
    from polytask.archs.backbones import MLP

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} for aliexpress; it has {list(ARCHS)}")
    names = list(task_names)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown AliExpress task(s) {unknown}; the tasks are {list(TASKS)}")
    if field_dims is None:
        if not _LAST_FIELD_DIMS:
            raise ValueError(
                "the AliExpress model needs the embedding table sizes: pass field_dims= "
                "(load_aliexpress(...).field_dims) or load the data first"
            )
        field_dims = _LAST_FIELD_DIMS[0]
    embed = AliExpressEmbedding(field_dims, embed_dim)
    widths = [embed.out_features, *bottom]

    def bottom_mlp(in_features: int) -> nn.Module:
        return MLP([in_features, *bottom], dropout=dropout, batchnorm=True, activate_last=True)

    def tower_mlp(task: str, in_features: int) -> nn.Module:
        return MLP([in_features, *tower, 1], dropout=dropout, batchnorm=True)

    if arch == "shared_bottom":
        heads = {t: tower_mlp(t, widths[-1]) for t in names}
        encoder = nn.Sequential(embed, bottom_mlp(widths[0]))
        return archs.create("hard_sharing", tasks=names, encoder=encoder, heads=heads)
    inner = archs.create(
        arch,
        tasks=names,
        in_features=embed.out_features,
        num_experts=num_experts,
        expert=bottom_mlp,
        tower=tower_mlp,
        expert_features=widths[-1],
    )
    return EmbeddedInputs(embed, inner)


def _load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
    del seed  # the split depends on data_seed only
    return load_aliexpress(root, **options).as_dict()


BENCHMARK = register(
    Benchmark(
        name="aliexpress",
        summary="AliExpress search logs (country=NL/ES/FR/US): CTR and CTCVR, MTReclib's recipe",
        source=(
            "Li et al., CIKM 2020 (data); MTReclib, easezyc/Multitask-Recommendation-Library "
            "(preprocessing, Shared-Bottom network, recipe)"
        ),
        tasks=tasks,
        load=_load,
        options=options_of(load_aliexpress),
        model=lambda arch, names: model(arch, names),
        archs=ARCHS,
        recipe=Recipe(epochs=50, batch_size=2048, optimizer="adam", lr=1e-3, weight_decay=1e-6),
        needs_root=True,
    )
)
