"""The river multi-target sets: file reading, encoding, splits and smoke runs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from polytask.data import river_sets
from polytask.errors import DataFormatError

if importlib.util.find_spec("river") is None:
    pytest.skip("river (which ships the data) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def solar():
    return river_sets.load("solar_flare", seed=0)


@pytest.fixture(scope="module")
def yeast():
    return river_sets.load("yeast", seed=0)


def test_tables_have_the_documented_rows_and_columns():
    header, rows = river_sets.read_table("solar_flare")
    assert len(rows) == 1066 and len(header) == 13
    assert rows[0] == ("H", "A", "X", "1", "3", "1", "1", "1", "1", "1", "0", "0", "0")
    header, rows = river_sets.read_table("yeast")
    assert len(rows) == 2417 and len(header) == 103 + 14
    assert header[-1] == "Class14" and rows[0][0] == "0.004168"


def test_solar_flare_features_are_one_hot_per_attribute(solar):
    x = torch.cat([d.inputs for d in solar.values()])
    assert x.shape == (1066, 33) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    # one code per attribute: ten 1s per row
    assert torch.equal(x.sum(dim=1), torch.full((1066,), 10.0))
    # The first row, H A X 1 3 1 1 1 1 1, by hand: the offset of each attribute's block
    # (7, 6, 4, 2, 3, 3, 2, 2, 2, 2 codes) plus the code's position in the UCI order.
    header, rows = river_sets.read_table("solar_flare")
    hot = np.flatnonzero(river_sets._encode("solar_flare", header, rows[:1])[0]).tolist()
    assert hot == [0 + 6, 7 + 3, 13 + 0, 17 + 0, 19 + 2, 22 + 0, 25 + 0, 27 + 0, 29 + 0, 31 + 0]


def test_solar_flare_targets_are_flare_counts(solar):
    for d in solar.values():
        assert set(d.targets) == {"c_flares", "m_flares", "x_flares"}
        for y in d.targets.values():
            assert y.dtype == torch.float32 and float(y.min()) >= 0
            assert torch.equal(y, y.round())
    everything = torch.cat([d.targets["c_flares"] for d in solar.values()])
    assert int((everything == 0).sum()) == 884  # the counts river's reader gives


def test_yeast_features_are_standardised_with_training_statistics(yeast):
    train = yeast["train"].inputs
    assert train.shape == (1691, 103)
    torch.testing.assert_close(train.mean(0), torch.zeros(103), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(103), atol=1e-4, rtol=0)
    # the other splits use the training statistics, not their own
    assert float(yeast["test"].inputs.mean(0).abs().max()) > 1e-3


def test_yeast_labels_are_binary(yeast):
    assert len(yeast["train"].targets) == 14
    for d in yeast.values():
        for y in d.targets.values():
            assert set(y.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name, n", [("solar_flare", 1066), ("yeast", 2417)])
def test_splits_are_disjoint_complete_and_deterministic(name, n):
    data = river_sets.load(name, seed=0)
    held = round(0.15 * n)
    assert [len(data[s]) for s in ("train", "val", "test")] == [n - 2 * held, held, held]
    rows = np.concatenate([d.source for d in data.values()])
    assert sorted(rows.tolist()) == list(range(n))
    again, other = river_sets.load(name, seed=0), river_sets.load(name, seed=1)
    for split in data:
        np.testing.assert_array_equal(again[split].source, data[split].source)
        assert torch.equal(again[split].inputs, data[split].inputs)
    assert not np.array_equal(other["train"].source, data["train"].source)


def test_options_and_errors():
    small = river_sets.load("yeast", seed=0, subset=100)
    assert [len(small[s]) for s in ("train", "val", "test")] == [100, 22, 22]
    with pytest.raises(ValueError, match="unknown yeast option"):
        river_sets.load("yeast", seed=0, rows=3)
    with pytest.raises(ValueError, match="unknown river set"):
        river_sets.load("music", seed=0)
    with pytest.raises(DataFormatError, match="codes"):
        river_sets._encode("solar_flare", ("zurich-class",), [("Z",)])


def test_models():
    for name, width in (("solar_flare", 33), ("yeast", 103)):
        tasks = river_sets.tasks(name).names
        for arch in ("shared_bottom", "mmoe"):
            out = river_sets.model(name, arch, tasks)(torch.zeros(4, width))
            assert set(out) == set(tasks) and out[tasks[0]].shape == (4, 1)


@pytest.mark.parametrize("name", ["solar_flare", "yeast"])
def test_smoke_run(name):
    from polytask.train.runner import run

    record = run(
        name,
        method="ew",
        seed=0,
        overrides={"epochs": 1, "batch_size": 32},
        data_options={"subset": 64},
    )
    assert set(record["test"]) == set(river_sets.tasks(name).directions)
    assert all(np.isfinite(v) for v in record["test"].values())
