"""`polytask run --nproc 2` launches torchrun and trains like one process; rank 0 alone
writes the store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from polytask.cli import main
from polytask.results import ResultsStore
from polytask.train.launch import without_nproc

EXIT_WORKER = """
import logging, sys
from polytask.train.launch import exit_worker
logging.basicConfig(stream=sys.stderr)
logging.getLogger("w").warning("logged")
print("printed", end="")
sys.stderr.write("written")
exit_worker(3)
print("never")
"""

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def test_without_nproc() -> None:
    argv = ["run", "b", "--nproc", "2", "--method", "ew", "--nproc=3", "--seeds", "0"]
    assert without_nproc(argv) == ["run", "b", "--method", "ew", "--seeds", "0"]


def test_exit_worker_flushes_and_leaves_with_the_code() -> None:
    """A worker leaves without the interpreter's shutdown, but nothing it printed or logged
    is lost and torchrun sees its exit code."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WORKER],
        capture_output=True,
        text=True,
        timeout=120,
        env=buffered,
    )
    assert done.returncode == 3
    assert done.stdout == "printed"
    assert "logged" in done.stderr and done.stderr.endswith("written")


def test_run_on_two_processes_matches_one(tmp_path) -> None:
    def run(name: str, *extra: str) -> ResultsStore:
        store = tmp_path / f"{name}.sqlite"
        argv = [
            "run",
            "synthetic_mmoe",
            "--method",
            "pcgrad",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--set",
            "select=loss",
            "--store",
            str(store),
            "--out",
            str(tmp_path / name),
        ]
        assert main([*argv, *extra]) == 0
        return ResultsStore(store)

    two = run("two", "--nproc", "2").runs()
    one = run("one").runs()
    assert [r.status for r in two] == ["finished"]  # one record, written once
    assert two[0].key == one[0].key
    assert set(two[0].test) == set(one[0].test)
    for metric, value in one[0].test.items():
        assert two[0].test[metric] == pytest.approx(value, rel=1e-4, abs=1e-5), metric
