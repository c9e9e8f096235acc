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
