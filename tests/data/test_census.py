"""The Census-Income loader: the shipped files, labels, encoding fitted on train, the split.

Fast tests read the first rows of each file (``max_rows``) or small files written from
them; the full-data check is marked slow (about 15 s: pass --runslow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polytask.data.census import (
    COLUMNS,
    NUMERIC,
    TEST_ROWS,
    TRAIN_ROWS,
    census_paths,
    load_census,
    read_rows,
)

ROWS = 3000


@pytest.fixture(scope="module")
def small():
    return load_census(seed=0, max_rows=ROWS)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 22), b""))


def test_shipped_files_have_the_papers_row_counts():
    """MMoE section 6.3.1: 199,523 training and 99,762 test examples."""
    train, test = census_paths()
    assert _count_lines(train) == TRAIN_ROWS == 199_523
    assert _count_lines(test) == TEST_ROWS == 99_762


def test_shapes_dtypes_and_split_sizes(small):
    assert len(small.train) == ROWS
    assert len(small.val) == len(small.test) == ROWS // 2
    for split in (small.train, small.val, small.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1] == small.num_features
        assert torch.isfinite(split.x).all()
        assert list(split.y) == ["income", "marital"] == list(small.tasks)
        for y in split.y.values():
            assert y.dtype == torch.float32 and y.shape == (len(split),)
            assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_labels_and_dropped_inputs(small):
    rows = read_rows(census_paths()[0], max_rows=ROWS)
    income = [r[-1] == "50000+." for r in rows]
    never = [r[COLUMNS.index("marital_stat")] == "Never married" for r in rows]
    assert small.train.y["income"].tolist() == [float(v) for v in income]
    assert small.train.y["marital"].tolist() == [float(v) for v in never]
    # Both classes occur, at the data's rates (income > 50K is rare, never married common).
    assert 0.02 < small.train.y["income"].mean() < 0.12
    assert 0.3 < small.train.y["marital"].mean() < 0.55
    # The labels' sources, education (the paper's other label) and the weight are no inputs.
    for name in ("education", "marital_stat", "instance_weight", "income"):
        assert not any(f == name or f.startswith(name + "=") for f in small.feature_names)
    assert small.feature_names[: len(NUMERIC)] == NUMERIC


def test_encoding_is_fitted_on_train(small):
    numeric = small.train.x[:, : len(NUMERIC)]
    assert torch.equal(numeric.min(0).values, torch.zeros(len(NUMERIC)))
    # Columns that vary in the subsample reach exactly 1 (constant ones stay 0).
    top = numeric.max(0).values
    assert set(top.tolist()) <= {0.0, 1.0} and top.sum() >= 5
    hot = small.train.x[:, len(NUMERIC) :]
    assert set(hot.unique().tolist()) == {0.0, 1.0}
    # One category per nominal attribute: 38 inputs, 7 numeric, so 31 ones per train row.
    assert torch.equal(hot.sum(1), torch.full((ROWS,), 31.0))


def test_out_of_range_and_unseen_values(tmp_path):
    """Scaling and vocabularies come from train alone: a test age above the train maximum
    scales past 1, a class of worker never seen in train encodes as all zeros."""
    rows = read_rows(census_paths()[0], max_rows=4)
    age, worker = COLUMNS.index("age"), COLUMNS.index("class_of_worker")
    for r, a in zip(rows, ("20", "30", "40", "60"), strict=True):
        r[age], r[worker] = a, "Private"
    test_rows = [list(r) for r in rows]
    test_rows[0][age], test_rows[0][worker] = "100", "Never worked"
    train_file, test_file = tmp_path / "train.csv", tmp_path / "test.csv"
    train_file.write_text("".join(", ".join(r) + "\n" for r in rows))
    test_file.write_text("".join(", ".join(r) + "\n" for r in test_rows))
    data = load_census(seed=0, paths=(train_file, test_file))
    x = torch.cat([data.val.x, data.test.x])
    ages = sorted(x[:, 0].tolist())
    assert ages == pytest.approx(sorted([2.0, 0.25, 0.5, 1.0]))  # (age - 20) / 40
    assert data.train.x[:, 0].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    worker_cols = [i for i, f in enumerate(data.feature_names) if f.startswith("class_of_worker=")]
    assert [data.feature_names[i] for i in worker_cols] == ["class_of_worker=Private"]
    unseen = x[x[:, 0] == 2.0]
    assert unseen[:, worker_cols].sum() == 0


def test_split_is_seeded_and_halves_the_test_file():
    a = load_census(seed=0, max_rows=400)
    b = load_census(seed=0, max_rows=400)
    c = load_census(seed=1, max_rows=400)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        for t in a.tasks:
            assert torch.equal(getattr(a, split).y[t], getattr(b, split).y[t])
    assert torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.val.x, c.val.x)
    # Validation and test partition the test file's rows, whatever the seed.
    for data in (a, c):
        both = torch.cat([data.val.x, data.test.x])
        full = load_census(seed=0, max_rows=400)
        every = torch.cat([full.val.x, full.test.x])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, every.tolist()))


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match="line 1: 3 fields"):
        read_rows(bad)
    with pytest.raises(ValueError, match="max_rows=1"):
        load_census(max_rows=1)
    with pytest.raises(TypeError, match="seed"):
        load_census(seed="0")


@pytest.mark.slow
def test_full_data():
    data = load_census(seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (199_523, 49_881, 49_881)
    train_file, test_file = census_paths()
    text = train_file.read_text()
    # Positive counts straight from the raw text (the label ends each line).
    assert data.train.y["income"].sum() == text.count("50000+.\n")
    assert data.train.y["marital"].sum() == text.count(", Never married, ")
    test_text = test_file.read_text()
    assert data.val.y["income"].sum() + data.test.y["income"].sum() == test_text.count("50000+.\n")
    # Every nominal value of the test file was seen in training.
    hot = torch.cat([data.val.x, data.test.x])[:, len(NUMERIC) :].sum(1)
    assert torch.equal(hot, torch.full_like(hot, 31.0))
