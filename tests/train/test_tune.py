"""`polytask tune`: Ray Tune trials with an Optuna searcher, every trial a run of the store,
scored on the validation Δm; spaces and errors. One local Ray instance for the module."""

from __future__ import annotations

import math

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

import polytask  # noqa: E402
from polytask.cli import main  # noqa: E402
from polytask.data import benchmark as benchmarks  # noqa: E402
from polytask.results import delta_m  # noqa: E402
from polytask.results.store import ResultsStore  # noqa: E402
from polytask.train.runner import baseline_scores, run_baselines  # noqa: E402
from polytask.train.tune import DEFAULT_SPACES, Space, TuneError, parse_space, tune  # noqa: E402

BENCH = "synthetic_mmoe"
RECIPE = {"epochs": 1, "batch_size": 256}


@pytest.fixture(scope="module")
def ray_session():
    with pytest.MonkeyPatch.context() as mp:
        # The test machine is shared: without this, Ray's memory monitor kills our workers
        # whenever other processes fill the node's memory, failing tests for no fault of ours.
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store_with_baselines(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "r.sqlite"
    run_baselines(BENCH, seeds=[0], overrides=RECIPE, store=ResultsStore(path))
    return path


def test_trials_are_runs_of_the_store_scored_on_validation_delta_m(
    ray_session, store_with_baselines, tmp_path, capsys
):
    store = ResultsStore(store_with_baselines)
    kw = {"seeds": [0], "overrides": RECIPE, "store": store_with_baselines, "out_dir": tmp_path}
    result = tune(BENCH, method="cagrad", trials=3, search_seed=7, **kw)
    assert [t.error for t in result.trials] == [None] * 3
    cs = [t.hparams["c"] for t in result.trials]
    assert len(set(cs)) == 3 and all(0.1 <= c <= 0.9 for c in cs)
    runs = store.runs(method="cagrad", status="finished")
    assert sorted(r.hparams["c"] for r in runs) == sorted(cs)
    # The score is the validation Δm of the selected epoch against the stored baselines.
    bench = benchmarks.get(BENCH)
    directions = {k: v for t in bench.tasks() for k, v in t.directions.items()}
    base = baseline_scores(store, BENCH, "shared_bottom", "val", bench.tasks().names, None)
    by_c = {r.hparams["c"]: delta_m(r.val, base, directions) for r in runs}
    for trial in result.trials:
        assert math.isclose(trial.score, by_c[trial.hparams["c"]], rel_tol=1e-12)
    assert result.best == min(result.trials, key=lambda t: t.score)
    assert "Δm" in result.objective

    # The same searcher seed proposes the same settings: all reused from the store.
    ended = [r.ended_at for r in store.runs()]
    args = ["tune", BENCH, "--method", "cagrad", "--trials", "3", "--search-seed", "7"]
    args += ["--store", str(store_with_baselines), "--out", str(tmp_path), "--epochs", "1"]
    assert main([*args, "--set", "batch_size=256"]) == 0
    out = capsys.readouterr().out
    assert f"best: c={result.best.hparams['c']!r}" in out
    assert [r.ended_at for r in store.runs()] == ended  # nothing retrained


def test_search_spaces():
    assert parse_space("c", "uniform(0.1, 0.9)") == Space("uniform", (0.1, 0.9))
    assert parse_space("g", " loguniform(1e-4, 1e-2)") == Space("loguniform", (1e-4, 1e-2))
    assert parse_space("n", "int(1, 25)") == Space("int", (1, 25))
    assert parse_space("m", "choice('none', 'l2')") == Space("choice", ("none", "l2"))
    assert str(parse_space("c", "uniform(0.1,0.9)")) == "uniform(0.1, 0.9)"
    # Tune's randint excludes its upper bound; ours includes it.
    assert parse_space("n", "int(1, 3)").to_tune().upper == 4
    for name, space in DEFAULT_SPACES.items():  # every default names a real hyper-parameter
        for key, spec in space.items():
            for value in parse_space(key, spec).values:
                polytask.methods.create(name, 2, **{key: value})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.4", r"SPEC must be uniform\(LOW, HIGH\).*--hparam c=VALUE"),
        ("normal(0, 1)", "SPEC must be"),
        ("uniform(0.9, 0.1)", "LOW 0.9 must be below HIGH 0.1"),
        ("uniform(0.1)", "uniform takes two finite numbers"),
        ("int(1.5, 3)", "int takes two integers"),
        ("loguniform(0, 1)", "loguniform needs LOW > 0"),
        ("choice(1, 1)", "at least two different values"),
        ("uniform(a, b)", "must be literals"),
    ],
)
def test_bad_spaces_are_refused(spec, message):
    with pytest.raises(TuneError, match=message) as exc:
        parse_space("c", spec)
    assert str(exc.value).startswith(f"search space c={spec}: ")


@pytest.mark.parametrize(
    ("method", "space", "message"),
    [
        ("mgda", None, "method 'mgda' has no default search space"),
        ("cagrad", {"cc": "uniform(0.1, 0.5)"}, "cc"),
        ("cagrad", {"c": "uniform(-1, 0.5)"}, r"search space c=uniform\(-1.0, 0.5\) for cagrad"),
        ("cagrad", {}, "empty"),
    ],
)
def test_bad_searches_fail_before_training(method, space, message, tmp_path):
    with pytest.raises(TuneError, match=message):
        tune(BENCH, method=method, trials=2, space=space, store=tmp_path / "r.sqlite")
    assert not (tmp_path / "r.sqlite").exists() or ResultsStore(tmp_path / "r.sqlite").runs() == []


@pytest.mark.parametrize(
    ("device", "gpus", "message"),
    [
        ("cuda:1", None, "device 'cuda:1' names a GPU"),
        ("cpu", 1, "num_gpus=1 with device 'cpu'"),
        ("cuda", 0, "num_gpus=0 with device 'cuda'"),
    ],
)
def test_bad_resources_fail_before_training(device, gpus, message, tmp_path):
    with pytest.raises(TuneError, match=message):
        tune(BENCH, method="cagrad", trials=2, device=device, num_gpus=gpus, store=tmp_path)


def test_tuning_on_delta_m_needs_the_baselines(tmp_path, capsys):
    args = ["tune", BENCH, "--method", "cagrad", "--trials", "2"]
    assert main([*args, "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "polytask baselines synthetic_mmoe" in capsys.readouterr().err
    assert ResultsStore(tmp_path / "r.sqlite").runs() == []
    assert main([*args, "--hparam", "c=0.5", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "['c'] are both searched and fixed" in capsys.readouterr().err
    assert main([*args, "--nproc", "2", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "a tune trial trains in one process" in capsys.readouterr().err


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    args = ["tune", BENCH, "--method", "cagrad", "--trials", "2"]
    assert main([*args, "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "polytask tune needs Ray" in capsys.readouterr().err


@pytest.mark.slow
def test_failed_trials_are_reported_and_stored(ray_session, store_with_baselines, tmp_path, capsys):
    args = ["tune", BENCH, "--method", "cagrad", "--trials", "2", "--epochs", "1"]
    args += ["--set", "batch_size=256", "--set", "lr=1e12"]  # the losses overflow at once
    args += ["--store", str(tmp_path / "r.sqlite"), "--out", str(tmp_path), "--set", "select=loss"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("NonFiniteError") == 2 and "every trial failed" in out
    runs = ResultsStore(tmp_path / "r.sqlite").runs()
    assert [r.status for r in runs] == ["failed", "failed"]
    assert len({r.hparams["c"] for r in runs}) == 2
