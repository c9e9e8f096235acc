"""Sweeps on Ray (`backend = "ray"`): the same store as the local backend, crash isolation,
resumability, and the configuration checks. One local Ray instance for the whole module."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ray = pytest.importorskip("ray")

from polytask.cli import main  # noqa: E402
from polytask.results.store import ResultsStore, RunSpec  # noqa: E402
from polytask.train import ray_backend  # noqa: E402
from polytask.train.sweep import ConfigError, Job, SweepConfig, parse_config  # noqa: E402

SWEEP = """
benchmark = "synthetic_mmoe"
methods = ["ew", "mgda"]
seeds = [0, 1]
store = "{store}"
out = "{out}"

[recipe]
epochs = 1
batch_size = 256
"""


@pytest.fixture(scope="module")
def ray_session():
    with pytest.MonkeyPatch.context() as mp:
        # The test machine is shared: without this, Ray's memory monitor kills our workers
        # whenever other processes fill the node's memory, failing tests for no fault of ours.
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The crashing job below is defined here: send it by value, not as an import of tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _rows(store: ResultsStore) -> dict[str, tuple]:
    """What a sweep computed, by run key (ids, hosts, pids and times left out)."""
    out = {}
    for r in store.runs():
        epochs = [(e["epoch"], e["split"], e["metrics"], e["losses"]) for e in store.epochs(r.id)]
        out[r.key] = (r.method, r.seed, r.hparams, r.recipe, r.status, r.best_epoch, r.val)
        out[r.key] += (r.test, epochs)
    return out


def test_ray_sweep_stores_what_the_local_sweep_stores_and_reruns_nothing(
    ray_session, tmp_path, capsys
):
    local, remote = tmp_path / "local", tmp_path / "ray"
    for where in (local, remote):
        where.mkdir()
        text = SWEEP.format(store=where / "r.sqlite", out=where / "runs")
        (where / "sweep.toml").write_text(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every Ray task runs (num_cpus = 1): the same float sums
    try:
        assert main(["sweep", str(local / "sweep.toml")]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert main(["sweep", str(remote / "sweep.toml"), "--backend", "ray"]) == 0
    out = capsys.readouterr().out
    assert "as Ray tasks" in out and "8 of 8 jobs done" in out
    expected = _rows(ResultsStore(local / "r.sqlite"))
    assert len(expected) == 8  # 2 tasks x 2 seeds of baselines, 2 methods x 2 seeds
    assert {v[4] for v in expected.values()} == {"finished"}
    stored = ResultsStore(remote / "r.sqlite")
    assert _rows(stored) == expected
    ended = [r.ended_at for r in stored.runs()]
    # The rerun recomputes nothing: every job is skipped and no row changes.
    assert main(["sweep", str(remote / "sweep.toml"), "--backend", "ray"]) == 0
    assert capsys.readouterr().out.count("skipped (already finished") == 8
    assert _rows(stored) == expected
    assert [r.ended_at for r in stored.runs()] == ended


def _crashing_job(item):
    job, config = item
    store = ResultsStore(config.store)
    run_id = store.claim(RunSpec(job.benchmark, job.arch, job.method, job.seed, {}, {}))
    if job.seed == 1:
        os._exit(9)  # the task's worker dies mid-run (out of memory, a signal, a native crash)
    store.finish(run_id, best_epoch=1, val={}, test={}, wall_time=0.0)
    return f"seed {job.seed}", "done"


def test_a_dead_task_fails_only_its_job_and_its_run_resumes(ray_session, tmp_path):
    config = SweepConfig(["b"], ["m"], [0, 1, 2], store=str(tmp_path / "r.sqlite"))
    config.backend = "ray"
    work = [(Job("b", "a", "m", seed, {}), config) for seed in (0, 1, 2)]
    seen = []
    outcomes = dict(
        ray_backend.run_jobs(work, config, lambda *o: seen.append(o), job_fn=_crashing_job)
    )
    assert sorted(seen) == sorted(outcomes.items())
    assert outcomes.pop("b/a/m/seed 1").startswith("failed: its worker process died")
    assert outcomes == {"seed 0": "done", "seed 2": "done"}
    # Not retried by Ray, and marked interrupted (not left running), so a rerun resumes it.
    runs = ResultsStore(config.store).runs()
    assert {r.seed: r.status for r in runs} == {0: "finished", 1: "interrupted", 2: "finished"}


BASE = 'benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseeds = [0]\n'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('backend = "slurm"', "backend 'slurm' is unknown; backends: ['local', 'ray']"),
        ('address = "auto"', "['address'] only apply to backend 'ray'"),
        ("num_cpus = 2", "['num_cpus'] only apply to backend 'ray'"),
        ('backend = "ray"\nnum_cpus = 0', "num_cpus must be positive, got 0"),
        ('backend = "ray"\nnum_gpus = -1', "num_gpus must be non-negative, got -1"),
        ('backend = "ray"\nnum_cpus = true', "num_cpus must be int, got True"),
        ('backend = "ray"\ndevice = "cuda:1"', "device 'cuda:1' names a GPU"),
        ('backend = "ray"\ndevice = "cuda"\nnum_gpus = 0', "num_gpus=0 with device 'cuda'"),
        ('backend = "ray"\nnum_gpus = 1', "num_gpus=1 with device 'cpu'"),
    ],
)
def test_bad_backend_settings_are_refused(extra, message):
    import tomllib

    with pytest.raises(ConfigError, match=f"^sweep.toml: .*{_escape(message)}"):
        parse_config(tomllib.loads(BASE + extra), where="sweep.toml")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_ray_settings_are_read():
    import tomllib

    raw = tomllib.loads(BASE + 'backend = "ray"\naddress = "auto"\nnum_cpus = 0.5\n')
    config = parse_config(raw)
    assert (config.backend, config.address, config.num_cpus, config.num_gpus) == (
        "ray",
        "auto",
        0.5,
        None,
    )
    assert parse_config(tomllib.loads(BASE)).backend == "local"


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import tomllib

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'polytask\[ray\]'"):
        parse_config(tomllib.loads(BASE + 'backend = "ray"\n'))
    with pytest.raises(ray_backend.RayNotInstalledError, match=r"pip install 'polytask\[ray\]'"):
        ray_backend.import_ray()
    config = tmp_path / "sweep.toml"
    config.write_text(BASE)
    assert main(["sweep", str(config), "--backend", "ray"]) == 2
    assert "pip install 'polytask[ray]'" in capsys.readouterr().err


def test_cli_flags_reach_the_config(tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(BASE)
    assert main(["sweep", str(config), "--address", "auto"]) == 2  # local backend
    assert "['address'] only apply to backend 'ray'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(config), "--backend", "slurm"])
    assert exc.value.code == 2
