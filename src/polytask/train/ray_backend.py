"""Sweeps on Ray: every job of a sweep as one Ray task, on this machine or a cluster.

``backend = "ray"`` in a sweep file (or ``polytask sweep CONFIG --backend ray``) hands the
jobs of :mod:`polytask.train.sweep` to Ray instead of a local process pool. Each task runs one
job exactly as a local worker does (:func:`polytask.train.sweep._run_job`): it claims the run
in the results store, trains it and records it, so finished runs are skipped and interrupted
ones resume, whichever machine picks them up. The baselines still finish before the
multi-task runs start (these select their epoch on Δm against them).

Resources: every task reserves ``num_cpus`` CPUs (default 1; its torch threads) and, with
``device = "cuda"``, ``num_gpus`` GPUs (default 1; Ray sets ``CUDA_VISIBLE_DEVICES``, so the
job's ``"cuda"`` is its own GPU). Ray runs as many jobs at once as the cluster's resources
allow; ``workers`` is the local backend's and is not used here.

Failures: a job that raises is reported failed and recorded so in the store, as locally. A
task whose worker process dies (killed, out of memory, a native crash) fails that job alone:
Ray does not retry it (``max_retries=0``, as the local pool reports such a job failed), and
the dead process's ``running`` row is marked ``interrupted`` by a store clean-up on every
node, since the store can only tell a dead process on the machine that ran it. The next run
of the sweep resumes it. Paths of a SQLite store, ``out`` and ``root`` are made absolute
before they are sent, so every node reads the same path. When jobs run on more than one
machine, use a PostgreSQL store (``store = "postgresql://..."``): SQLite's WAL journal does
not work over a network file system. See docs/ray.md for the cluster commands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from polytask.errors import PolytaskError

__all__ = [
    "RayNotInstalledError",
    "connect",
    "gpus_per_job",
    "import_ray",
    "resources_problem",
    "run_jobs",
    "run_sweep",
]

#: What a job outcome callback receives: (run label, outcome).
OnResult = Callable[[str, str], Any] | None


class RayNotInstalledError(PolytaskError, ImportError):
    """Ray (the optional extra ``polytask[ray]``) is needed but not installed."""


def resources_problem(device: str, num_cpus: float, num_gpus: float | None) -> str | None:
    """What is wrong with running jobs (or trials) on ``device`` that reserve ``num_cpus`` CPUs
    and ``num_gpus`` GPUs each (``None``: 1 with a cuda device), or ``None`` if nothing is."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install 'polytask[ray]'"
    if isinstance(num_cpus, bool) or not num_cpus > 0:
        return f"num_cpus must be positive, got {num_cpus!r}"
    if num_gpus is not None and num_gpus < 0:
        return f"num_gpus must be non-negative, got {num_gpus!r}"
    if device.startswith("cuda"):
        if device != "cuda":
            return f"device {device!r} names a GPU; give device 'cuda' (Ray gives each its GPUs)"
        if num_gpus == 0:
            return (
                "num_gpus=0 with device 'cuda': Ray shows no GPU to a job that reserves none; "
                "give num_gpus > 0 (1 by default)"
            )
    elif num_gpus:
        return (
            f"num_gpus={num_gpus} with device {device!r} reserves GPUs the jobs never use; "
            "set device 'cuda' or leave num_gpus out"
        )
    return None


def gpus_per_job(device: str, num_gpus: float | None) -> float:
    """The GPUs a job reserves: ``num_gpus``, 1 by default with a cuda device, else none."""
    if not device.startswith("cuda"):
        return 0
    return 1 if num_gpus is None else num_gpus


def import_ray(what: str = "backend 'ray'") -> ModuleType:
    """The ``ray`` module, or :class:`RayNotInstalledError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(
            f"{what} needs Ray, which is not installed: pip install 'polytask[ray]'"
        ) from exc
    return ray


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``"auto"``: the one started on this machine with
    ``ray start``), or start a Ray instance of this process's own when ``address`` is ``None``
    (not Ray's default of joining a cluster it finds: without an address, nothing but this
    machine runs the jobs).

    A Ray session already open in this process (a notebook's, a test's) is used as it is.
    Returns whether this call opened the session, so that the caller shuts it down.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address or "local")
    return True


def run_sweep(config: Any, *, on_result: OnResult = None) -> list[tuple[str, str]]:
    """:func:`polytask.train.sweep.run_sweep` on Ray: the baselines, then the multi-task runs."""
    from polytask.train.sweep import jobs

    ray = import_ray()
    config = _portable(config)
    started = connect(config.address)
    try:
        results: list[tuple[str, str]] = []
        for phase in jobs(config):
            if phase:
                results.extend(run_jobs([(job, config) for job in phase], config, on_result))
        return results
    finally:
        if started:
            ray.shutdown()


def run_jobs(
    work: list[tuple[Any, Any]],
    config: Any,
    on_result: OnResult = None,
    job_fn: Callable[[tuple[Any, Any]], tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """Run ``work`` (``(Job, SweepConfig)`` pairs) as Ray tasks; (label, outcome) per job in
    the order they end. ``job_fn`` replaces the job runner (the tests crash one with it)."""
    from polytask.train.sweep import _label, _run_job

    ray = import_ray()
    _mark_stale_everywhere(ray, config.store)
    gpus = gpus_per_job(config.device, config.num_gpus)
    task = ray.remote(_task).options(num_cpus=config.num_cpus, num_gpus=gpus, max_retries=0)
    # The local pool shares the machine's cores through `workers`; Ray reserves them instead.
    single = dataclasses.replace(config, workers=1)
    threads = max(1, int(config.num_cpus))
    refs = {task.remote(job_fn or _run_job, (job, single), threads): job for job, _ in work}
    pending, outcomes, died = list(refs), [], False
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:  # a BaseException the job let through
                outcome = (_label(refs[done[0]]), f"failed: {exc.cause!r}")
            except ray.exceptions.RayError as exc:  # its worker process or node died
                died = True
                reason = f"failed: its worker process died ({type(exc).__name__})"
                outcome = (_label(refs[done[0]]), reason)
            outcomes.append(outcome)
            if on_result:
                on_result(*outcome)
    except BaseException:
        # Ctrl-C: the tasks get KeyboardInterrupt, so their runs are marked interrupted.
        for ref in pending:
            ray.cancel(ref)
        raise
    if died:
        _mark_stale_everywhere(ray, config.store)
    return outcomes


def _task(job_fn: Callable, item: tuple[Any, Any], threads: int) -> tuple[str, str]:
    import torch

    torch.set_num_threads(threads)
    return job_fn(item)


def _mark_stale(store: str) -> int:
    from polytask.results.store import ResultsStore

    return ResultsStore(store).mark_stale()


def _mark_stale_everywhere(ray: ModuleType, store: str) -> None:
    """Mark the store's ``running`` rows whose process is gone as ``interrupted``, on every
    node (a row is only known dead on the host that wrote it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    clean = ray.remote(_mark_stale)
    refs = [
        clean.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(store)
        for node in ray.nodes()
        if node["Alive"]
    ]
    ray.get(refs)


def _portable(config: Any) -> Any:
    """``config`` with its local paths absolute (a task's working folder is not the driver's)."""
    changes: dict[str, str] = {"out": str(Path(config.out).resolve())}
    if not config.store.startswith(("postgresql://", "postgres://")):
        changes["store"] = str(Path(config.store).resolve())
    if config.root is not None:
        changes["root"] = str(Path(config.root).resolve())
    return dataclasses.replace(config, **changes)
