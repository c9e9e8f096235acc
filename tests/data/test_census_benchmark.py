"""The registered ``census`` benchmark trains end to end on the first rows of the data."""

from __future__ import annotations

from polytask.data import benchmark
from polytask.results import ResultsStore
from polytask.train.runner import run, run_baselines


def test_census_benchmark_trains_and_reports_auc(tmp_path):
    bench = benchmark.get("census")
    assert bench.tasks().directions == {
        "income/auc": True,
        "income/acc": True,
        "marital/auc": True,
        "marital/acc": True,
    }
    store = ResultsStore(tmp_path / "r.sqlite")
    small = {"overrides": {"epochs": 1}, "data_options": {"max_rows": 2000}, "store": store}
    run_baselines("census", seeds=[0], arch="mmoe", **small)
    record = run("census", method="mgda", seed=0, arch="mmoe", **small)
    assert set(record["test"]) == set(bench.tasks().directions)
    assert 0.5 < record["test"]["marital/auc"] <= 1.0
