"""Sweeps survive a worker process that dies: only its job fails, the others finish."""

from __future__ import annotations

import os

import pytest

from polytask.results.store import ResultsStore, RunSpec
from polytask.train.sweep import ConfigError, Job, SweepConfig, _run_pool, parse_config


def _job(item):
    job, config = item
    store = ResultsStore(config.store)
    run_id = store.claim(RunSpec(job.benchmark, job.arch, job.method, job.seed, {}, {}))
    if job.seed == 1:
        os._exit(9)  # a worker killed mid-run (out of memory, a signal, a native crash)
    store.finish(run_id, best_epoch=1, val={}, test={}, wall_time=0.0)
    return f"seed {job.seed}", "done"


def test_a_dead_worker_fails_only_its_job(tmp_path):
    config = SweepConfig(["b"], ["m"], [0, 1, 2, 3], store=str(tmp_path / "r.sqlite"))
    work = [(Job("b", "a", "m", seed, {}), config) for seed in (0, 1, 2, 3)]
    outcomes = dict(_run_pool(work, 2, None, job_fn=_job))
    assert outcomes.pop("b/a/m/seed 1") == "failed: its worker process died"
    assert outcomes == {"seed 0": "done", "seed 2": "done", "seed 3": "done"}
    statuses = {r.seed: r.status for r in ResultsStore(config.store).runs()}
    assert statuses == {0: "finished", 1: "interrupted", 2: "finished", 3: "finished"}


def test_unknown_data_option_is_a_config_error_before_anything_runs() -> None:
    raw = {"benchmark": "synthetic_mmoe", "methods": ["ew"], "seeds": [0], "data": {"rhoo": 0.5}}
    with pytest.raises(ConfigError, match=r"\[data\].*'rhoo'.*accepts \['data_seed', 'rho'\]"):
        parse_config(raw)
    assert parse_config({**raw, "data": {"rho": 0.5}}).data == {"rho": 0.5}


def test_every_benchmark_declares_the_options_its_loader_takes() -> None:
    import inspect

    from polytask.data import benchmark as benchmarks

    for name in benchmarks.available():
        bench = benchmarks.get(name)
        for option in bench.options:
            assert option not in ("root", "seed"), (name, option)
        params = inspect.signature(bench.load).parameters
        explicit = [
            n
            for n, p in params.items()
            if n not in ("seed", "root") and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        # An explicit keyword of the loader is a declared option.
        assert set(explicit) <= set(bench.options), (name, explicit, bench.options)
