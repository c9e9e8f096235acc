"""The runner: context the trainer needs is derived from the benchmark's tasks."""

from __future__ import annotations

import pytest

from polytask.data import benchmark
from polytask.train.runner import _kpi_metrics


def test_kpis_are_each_tasks_first_higher_is_better_metric():
    assert _kpi_metrics(benchmark.get("multi_mnist").tasks()) == {
        "left": "left/acc",
        "right": "right/acc",
    }
    with pytest.raises(ValueError, match="task 'y1' has no higher-is-better metric"):
        _kpi_metrics(benchmark.get("synthetic_mmoe").tasks())


def test_an_interrupted_run_resumes_under_its_own_record(tmp_path, monkeypatch):
    from polytask.results import ResultsStore
    from polytask.train import runner
    from polytask.train.trainer import Trainer

    store = ResultsStore(tmp_path / "r.sqlite")
    kwargs = dict(seed=0, store=store, out_dir=tmp_path / "runs", overrides={"epochs": 3})
    runner.run_baselines(
        "synthetic_mmoe", seeds=[0], store=store, out_dir=tmp_path / "runs", overrides={"epochs": 3}
    )
    fit = Trainer.fit

    def killed(self, **kw):
        fit(self, stop_after_steps=100, **kw)  # 63 steps per epoch: stops inside epoch 2
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run("synthetic_mmoe", method="ew", **kwargs)
    (first,) = store.runs(method="ew")
    assert first.status == "interrupted"
    monkeypatch.setattr(Trainer, "fit", fit)
    record = runner.run("synthetic_mmoe", method="ew", **kwargs)
    (rec,) = store.runs(method="ew")
    assert (
        rec.id == first.id and rec.status == "finished" and rec.best_epoch == record["best_epoch"]
    )
    assert [e["epoch"] for e in store.epochs(rec.id, "val")] == [1, 2, 3]
