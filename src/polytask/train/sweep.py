"""Sweeps: benchmarks x architectures x methods x seeds from a TOML file, on local workers.

A sweep first trains (or reuses) the single-task baselines, then every multi-task run, each
as one job in a pool of worker processes that share the results store. Finished runs are
never recomputed, and a run killed mid-way resumes from its checkpoint, so rerunning a sweep
continues it.

The configuration file::

    benchmark = "synthetic_mmoe"        # or benchmarks = ["...", "..."]
    methods = ["ew", "mgda", "famo"]
    archs = ["shared_bottom", "mmoe"]   # default: the benchmark's default architecture
    seeds = [0, 1, 2]
    baselines = true                    # train the single-task baselines first
    store = "runs/results.sqlite"
    out = "runs"                        # checkpoints and logs, one folder per run
    workers = 2
    device = "cpu"
    backend = "local"                   # or "ray": every job a Ray task (polytask[ray])
    address = "auto"                    # ray: join this cluster (left out: start Ray here)
    num_cpus = 1                        # ray: CPUs reserved per job
    num_gpus = 1                        # ray: GPUs per job (default 1 with a cuda device)

    [recipe]                            # overrides of the benchmark's recipe
    epochs = 3

    [hparams.cagrad]                    # hyper-parameters per method
    c = 0.4

    [data]                              # data options of the benchmark (e.g. rho)
    rho = 0.5
"""

from __future__ import annotations

import difflib
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

import polytask
from polytask.data import benchmark as benchmarks

__all__ = ["ConfigError", "SweepConfig", "load_config", "run_sweep"]


class ConfigError(polytask.errors.PolytaskError, ValueError):
    """A sweep configuration is invalid (the message names the key)."""


@dataclass
class SweepConfig:
    benchmarks: list[str]
    methods: list[str]
    seeds: list[int]
    archs: list[str] | None = None
    baselines: bool = True
    store: str = "runs/results.sqlite"
    out: str = "runs"
    workers: int = 1
    device: str = "cpu"
    root: str | None = None
    backend: str = "local"
    address: str | None = None
    num_cpus: float = 1
    num_gpus: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


_TYPES: dict[str, tuple[type, ...]] = {
    "benchmark": (str,),
    "benchmarks": (list,),
    "methods": (list,),
    "seeds": (list,),
    "archs": (list,),
    "baselines": (bool,),
    "store": (str,),
    "out": (str,),
    "workers": (int,),
    "device": (str,),
    "root": (str,),
    "backend": (str,),
    "address": (str,),
    "num_cpus": (int, float),
    "num_gpus": (int, float),
    "recipe": (dict,),
    "hparams": (dict,),
    "data": (dict,),
}


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


_BACKENDS = ("local", "ray")


def _check_backend(raw: Mapping[str, Any], where: str) -> None:
    backend = raw.get("backend", "local")
    if backend not in _BACKENDS:
        raise _fail(where, f"backend {backend!r} is unknown; backends: {list(_BACKENDS)}")
    ray_only = [key for key in ("address", "num_cpus", "num_gpus") if key in raw]
    if backend == "local":
        if ray_only:
            raise _fail(where, f"{ray_only} only apply to backend 'ray'; this sweep's is 'local'")
        return
    from polytask.train.ray_backend import resources_problem

    problem = resources_problem(
        raw.get("device", "cpu"), raw.get("num_cpus", 1), raw.get("num_gpus")
    )
    if problem is not None:
        raise _fail(where, problem)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep TOML file; ``overrides`` (from CLI flags) win over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no sweep configuration at {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw, where=str(path))


def parse_config(raw: Mapping[str, Any], where: str = "config") -> SweepConfig:
    for key, value in raw.items():
        if key not in _TYPES:
            close = difflib.get_close_matches(key, _TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(where, f"unknown key {key!r}{hint}; keys: {sorted(_TYPES)}")
        types = _TYPES[key]
        if isinstance(value, bool) and bool not in types:
            raise _fail(where, f"{key} must be {types[0].__name__}, got {value!r}")
        if not isinstance(value, types):
            raise _fail(
                where, f"{key} must be {types[0].__name__}, got {type(value).__name__} {value!r}"
            )
    if ("benchmark" in raw) == ("benchmarks" in raw):
        raise _fail(where, "give exactly one of 'benchmark' (a name) or 'benchmarks' (a list)")
    names = [raw["benchmark"]] if "benchmark" in raw else list(raw["benchmarks"])
    for name in names:
        try:
            benchmarks.get(name)
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
    for key in ("methods", "seeds"):
        if key not in raw or not raw[key]:
            raise _fail(where, f"{key!r} is required and must not be empty")
    for name in raw["methods"]:
        if not isinstance(name, str):
            raise _fail(where, f"methods must be names, got {name!r}")
        try:
            polytask.methods.get(name)
        except ValueError as exc:
            raise _fail(where, f"methods: {exc}") from None
    for seed in raw["seeds"]:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise _fail(where, f"seeds must be non-negative integers, got {seed!r}")
    if raw.get("workers", 1) < 1:
        raise _fail(where, f"workers must be at least 1, got {raw['workers']}")
    _check_backend(raw, where)
    hparams = raw.get("hparams", {})
    for method, values in hparams.items():
        if method not in raw["methods"]:
            raise _fail(where, f"[hparams.{method}] is for a method not in methods")
        if not isinstance(values, dict):
            raise _fail(where, f"[hparams.{method}] must be a table of hyper-parameters")
        for name in names:
            k = len(benchmarks.get(name).tasks())
            try:
                polytask.methods.create(method, k, **values)
            except (TypeError, ValueError) as exc:
                raise _fail(where, f"[hparams.{method}] for {name} ({k} tasks): {exc}") from None
    for name in names:
        bench = benchmarks.get(name)
        try:
            bench.recipe.override(raw.get("recipe", {}))
        except (KeyError, TypeError) as exc:
            raise _fail(where, f"[recipe]: {exc.args[0]}") from None
        for arch in raw.get("archs") or []:
            try:
                bench.check_arch(arch)
            except ValueError as exc:
                raise _fail(where, f"archs: {exc}") from None
        try:
            bench.check_options(raw.get("data", {}))
        except ValueError as exc:
            raise _fail(where, f"[data]: {exc}") from None
    return SweepConfig(
        benchmarks=names,
        methods=list(raw["methods"]),
        seeds=list(raw["seeds"]),
        archs=list(raw["archs"]) if raw.get("archs") else None,
        baselines=raw.get("baselines", True),
        store=raw.get("store", "runs/results.sqlite"),
        out=raw.get("out", "runs"),
        workers=raw.get("workers", 1),
        device=raw.get("device", "cpu"),
        root=raw.get("root"),
        backend=raw.get("backend", "local"),
        address=raw.get("address"),
        num_cpus=raw.get("num_cpus", 1),
        num_gpus=raw.get("num_gpus"),
        recipe=dict(raw.get("recipe", {})),
        hparams={k: dict(v) for k, v in hparams.items()},
        data=dict(raw.get("data", {})),
    )


@dataclass(frozen=True)
class Job:
    benchmark: str
    arch: str
    method: str
    seed: int
    hparams: Mapping[str, Any]
    tasks_subset: tuple[str, ...] | None = None


def jobs(config: SweepConfig) -> tuple[list[Job], list[Job]]:
    """(single-task baseline jobs, multi-task jobs) of a sweep."""
    from polytask.train.runner import STL

    base, multi = [], []
    for name in config.benchmarks:
        bench = benchmarks.get(name)
        for arch in config.archs or [bench.archs[0]]:
            if config.baselines:
                for task in bench.tasks().names:
                    for seed in config.seeds:
                        base.append(Job(name, arch, STL, seed, {}, (task,)))
            for method in config.methods:
                for seed in config.seeds:
                    multi.append(Job(name, arch, method, seed, config.hparams.get(method, {})))
    return base, multi


def _run_job(args: tuple[Job, SweepConfig]) -> tuple[str, str]:
    job, config = args
    import os

    import torch

    from polytask.results.store import ResultsStore
    from polytask.train.runner import run

    if config.workers > 1:
        # Share the cores between the workers instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))

    label = _label(job)
    try:
        record = run(
            job.benchmark,
            method=job.method,
            seed=job.seed,
            arch=job.arch,
            hparams=job.hparams,
            overrides=config.recipe,
            store=ResultsStore(config.store),
            out_dir=config.out,
            device=config.device,
            root=config.root,
            data_options=config.data,
            tasks_subset=list(job.tasks_subset) if job.tasks_subset else None,
        )
    except Exception as exc:  # one failed run must not stop the sweep; the store has it
        return label, f"failed: {type(exc).__name__}: {exc}"
    return label, "skipped (already finished or running elsewhere)" if record is None else "done"


def run_sweep(config: SweepConfig, *, on_result: Any = None) -> list[tuple[str, str]]:
    """Run the sweep's baselines, then its multi-task runs, on ``config.workers`` processes
    (or as Ray tasks with ``config.backend == "ray"``: :mod:`polytask.train.ray_backend`).

    Returns (run label, outcome) for every job; ``on_result`` is called with each as it ends.
    """
    from polytask.results.store import ResultsStore

    if config.backend == "ray":
        from polytask.train import ray_backend

        return ray_backend.run_sweep(config, on_result=on_result)
    ResultsStore(config.store).mark_stale()
    results: list[tuple[str, str]] = []
    for phase in jobs(config):
        if not phase:
            continue
        work = [(job, config) for job in phase]
        if config.workers == 1:
            outcomes: Sequence[tuple[str, str]] = []
            for item in work:
                outcome = _run_job(item)
                outcomes.append(outcome)  # type: ignore[attr-defined]
                if on_result:
                    on_result(*outcome)
        else:
            outcomes = _run_pool(work, config.workers, on_result)
        results.extend(outcomes)
    return results


def _run_pool(
    work: list, workers: int, on_result: Any, job_fn: Any = None
) -> list[tuple[str, str]]:
    """Run the jobs on ``workers`` spawned processes.

    A worker that dies (killed, out of memory, a crash in native code) breaks the pool and
    every unfinished job with it, without saying which job killed it. Those jobs then run
    again one at a time, each in a process of its own, so only the job that kills its
    process is reported failed; its run is marked interrupted in the store, not lost.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from polytask.results.store import ResultsStore

    def report(outcome: tuple[str, str]) -> None:
        outcomes.append(outcome)
        if on_result:
            on_result(*outcome)

    job_fn = job_fn or _run_job
    ctx = mp.get_context("spawn")
    outcomes: list[tuple[str, str]] = []
    unfinished = []
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(job_fn, item): item for item in work}
        for future in as_completed(futures):
            try:
                report(future.result())
            except BrokenProcessPool:
                unfinished.append(futures[future])
    store = ResultsStore(work[0][1].store) if work else None
    for item in unfinished:
        assert store is not None
        store.mark_stale()
        with ProcessPoolExecutor(1, mp_context=ctx) as alone:
            try:
                report(alone.submit(job_fn, item).result())
            except BrokenProcessPool:
                report((_label(item[0]), "failed: its worker process died"))
    if unfinished and store is not None:
        store.mark_stale()
    return outcomes


def _label(job: Job) -> str:
    label = f"{job.benchmark}/{job.arch}/{job.method}/seed {job.seed}"
    if job.tasks_subset:
        label += f" ({job.tasks_subset[0]})"
    return label
