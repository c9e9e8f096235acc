"""The SQLite results store: concurrent writers, interrupted runs, no recomputation."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from polytask.results.store import ResultsStore, RunSpec


def spec(method="ew", seed=0, **hp):
    return RunSpec("tiny", "hard_sharing", method, seed, hp, {"epochs": 2})


def _worker(path: str, worker: int, runs: int) -> None:
    store = ResultsStore(path)
    for i in range(runs):
        run_id = store.claim(spec(f"m{worker}", i))
        assert run_id is not None
        for epoch in (1, 2):
            store.log_epoch(run_id, epoch, "val", {"t/acc": 0.5 + epoch / 10}, [1.0, 2.0])
        store.finish(run_id, best_epoch=2, val={"t/acc": 0.7}, test={"t/acc": 0.6}, wall_time=1.0)


def _claim_and_die(path: str) -> None:
    ResultsStore(path).claim(spec("dies"))
    os._exit(0)  # no finish, no fail: a killed worker


def test_concurrent_writers(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(path, w, 5)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ResultsStore(path)
    runs = store.runs(status="finished")
    assert len(runs) == 20
    assert {r.method for r in runs} == {"m0", "m1", "m2", "m3"}
    assert all(len(store.epochs(r.id, "val")) == 2 for r in runs)


def test_finished_runs_are_not_recomputed(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    run_id = store.claim(spec(lr=0.1), provenance={"torch_version": "2.13.0"})
    assert run_id is not None and not store.finished(spec(lr=0.1))
    store.finish(run_id, best_epoch=1, val={"a": 1.0}, test={"a": float("nan")}, wall_time=2.0)
    assert store.finished(spec(lr=0.1))
    assert store.claim(spec(lr=0.1)) is None
    assert store.claim(spec(lr=0.2)) is not None  # other hyper-parameters: another run
    (rec,) = store.runs(key=spec(lr=0.1).key)
    assert rec.hparams == {"lr": 0.1} and rec.torch_version == "2.13.0"
    assert rec.val == {"a": 1.0} and rec.test["a"] != rec.test["a"]  # NaN survives


def test_killed_run_is_marked_interrupted_and_rerun(tmp_path):
    path = str(tmp_path / "r.sqlite")
    p = mp.get_context("spawn").Process(target=_claim_and_die, args=(path,))
    p.start()
    p.join(60)
    store = ResultsStore(path)
    (dead,) = store.runs(method="dies")
    assert dead.status == "running"
    # The interrupted run is continued under its own row: one record per run.
    assert store.claim(spec("dies")) == dead.id
    assert [r.status for r in store.runs(method="dies")] == ["running"]


def test_a_reused_pid_does_not_keep_a_dead_run_alive(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    run_id = store.claim(spec())
    # Pretend the claimer died and pid 1 (alive, started long before) took its number.
    with store._connect() as conn:
        conn.execute("UPDATE runs SET pid = 1, proc_start = '1' WHERE id = ?", (run_id,))
    assert store.mark_stale() == 1
    assert store.runs()[0].status == "interrupted"


def test_non_finite_numbers_and_strings_survive_the_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    run_id = store.claim(RunSpec("b", "a", "m", 0, {"mode": "inf"}, {"lr": float("inf")}))
    store.log_epoch(run_id, 1, "val", {"a": float("nan")}, [float("inf"), 1.0])
    (rec,) = store.runs()
    assert rec.hparams == {"mode": "inf"} and rec.recipe == {"lr": float("inf")}
    (row,) = store.epochs(run_id)
    assert row["losses"][0] == float("inf") and row["metrics"]["a"] != row["metrics"]["a"]


def test_failed_runs_keep_their_error(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    run_id = store.claim(spec())
    store.fail(run_id, "Traceback ... SolverError: no bargaining solution")
    (rec,) = store.runs()
    assert rec.status == "failed" and "SolverError" in rec.error
    with pytest.raises(ValueError, match="unknown run column"):
        store.runs(nope=1)
