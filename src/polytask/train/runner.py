"""Runs of registered benchmarks: multi-task runs, single-task baselines, the store.

:func:`run` trains one (benchmark, architecture, method, seed) and records it in the results
store; :func:`run_baselines` trains the single-task baselines the same way (one network per
task, same backbone, recipe and seeds; method ``"stl"``); :func:`baseline_scores` averages
them over seeds, which is what Δm is measured against.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import polytask
from polytask.data import benchmark as benchmarks
from polytask.distributed import rank_and_world
from polytask.results.store import ResultsStore, RunSpec, _dumps, _loads
from polytask.tasks import TaskSet
from polytask.train.provenance import provenance
from polytask.train.trainer import TrainConfig, Trainer

__all__ = ["STL", "RunSetupError", "baseline_scores", "run", "run_baselines"]


class RunSetupError(polytask.errors.PolytaskError, ValueError):
    """A run cannot start as asked (nothing was trained or stored); the message says why."""


#: The method name under which single-task baselines are stored.
STL = "stl"

_DATA_CACHE: dict[tuple[str, int, str | None, tuple], dict[str, Any]] = {}


def _datasets(bench: benchmarks.Benchmark, root: str | None, options: Mapping[str, Any]):
    key = (bench.name, 0, root, tuple(sorted(options.items())))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = bench.load(root=root, **options)
    return _DATA_CACHE[key]


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        # The process's peak resident memory so far (a sweep worker's includes earlier runs).
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not on this platform
        return None


def run(
    benchmark: str,
    *,
    method: str,
    seed: int,
    arch: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    store: ResultsStore | None = None,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    root: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    tasks_subset: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Train one run; return its record (``None`` when the store already holds it finished).

    ``tasks_subset`` trains only those tasks (a single one: a single-task baseline, stored
    with method ``"stl"``). Validation-based selection uses Δm against the stored
    single-task baselines when they exist, else against this run's first validation scores.
    """
    bench = benchmarks.get(benchmark)
    arch = bench.check_arch(arch)
    recipe = bench.recipe.override(dict(overrides or {}))
    hparams = dict(hparams or {})
    data_options = dict(data_options or {})
    all_tasks = bench.tasks()
    names = list(tasks_subset) if tasks_subset else all_tasks.names
    unknown = [t for t in names if t not in all_tasks.names]
    if unknown:
        raise RunSetupError(f"unknown task(s) {unknown} for {benchmark}; tasks: {all_tasks.names}")
    tasks = TaskSet([t for t in all_tasks if t.name in names])
    is_stl = method == STL
    if is_stl and len(names) != 1:
        raise RunSetupError("a single-task baseline trains exactly one task (tasks_subset=[task])")
    recipe_dict = {**asdict(recipe), "data": data_options}
    spec = RunSpec(
        benchmark,
        arch,
        method,
        seed,
        {
            **hparams,
            **({"task": names[0]} if is_stl else {}),
            **({"tasks": names} if tasks_subset and not is_stl else {}),
        },
        recipe_dict,
    )
    select = recipe.select
    if is_stl and select not in ("delta_m", "loss") and not select.startswith(f"{names[0]}/"):
        # A per-metric selection names one task's metric; the other baselines select on Δm
        # against their first validation scores (monotone in a single metric).
        select = "delta_m"

    def look_up_baselines() -> dict[str, float] | None:
        if store is None or is_stl:
            return None
        found = baseline_scores(store, benchmark, arch, "val", names, recipe_dict) or None
        if found is None and select == "delta_m":
            raise RunSetupError(
                f"selecting {benchmark} runs on Δm needs the single-task baselines of "
                f"architecture {arch!r} with this recipe in the store; run `polytask baselines "
                f"{benchmark}` with the same --arch/--set/--epochs first, or select on the "
                "validation loss with --set select=loss"
            )
        return found

    # Under torchrun, rank 0 alone reads and writes the store; the others follow its answer.
    rank, _ = rank_and_world()
    baselines = _on_rank_zero(look_up_baselines)
    claimed = _on_rank_zero(
        lambda: None if store is None else store.claim(spec, provenance=provenance())
    )
    if store is not None and claimed is None:
        return None
    run_id = claimed if rank == 0 else None
    try:
        splits = _datasets(bench, root, data_options)
        torch.manual_seed(seed)
        model = bench.model(arch, names)
        balancing = polytask.methods.create(
            "ew" if is_stl else method,
            len(names),
            **({} if is_stl else _with_seed(method, hparams, seed)),
        )
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        config = TrainConfig(
            kpi_metrics=_kpi_metrics(tasks) if "kpis" in balancing.needs else None,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            eval_batch_size=recipe.eval_batch_size,
            mode="params" if is_stl else recipe.mode,  # type: ignore[arg-type]
            select=select,
            precision=recipe.precision,  # type: ignore[arg-type]
            accumulate=recipe.accumulate,
            grad_clip=recipe.grad_clip,
            scheduler_interval=recipe.scheduler_interval,  # type: ignore[arg-type]
            checkpoint_every=recipe.checkpoint_every,
            num_workers=recipe.num_workers,
            seed=seed,
            device=device,
            progress=progress,
        )
        run_dir = None if out_dir is None else Path(out_dir) / spec.key
        trainer = Trainer(
            model,
            tasks,
            balancing,
            recipe.make_optimizer,
            splits["train"],
            splits["val"],
            splits.get("test"),
            config=config,
            scheduler=recipe.make_scheduler if recipe.scheduler else None,
            baselines=baselines,
            out_dir=run_dir,
        )
        if store is not None and run_id is not None:
            trainer.on_epoch = lambda record: _log_epoch(store, run_id, record)
        result = trainer.fit(resume=run_dir is not None)
        if store is not None and run_id is not None:
            # The whole history, also the epochs an earlier (interrupted) process trained.
            for epoch_record in result.history:
                _log_epoch(store, run_id, epoch_record)
    except BaseException as exc:
        if store is not None and run_id is not None:
            status = "failed" if isinstance(exc, Exception) else "interrupted"
            store.fail(run_id, traceback.format_exc(), status=status)
        raise
    record = {
        "key": spec.key,
        "benchmark": benchmark,
        "arch": arch,
        "method": method,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "val": result.val,
        "test": result.test,
        "wall_time": result.wall_time,
    }
    if store is not None and run_id is not None:
        store.finish(
            run_id,
            best_epoch=result.best_epoch,
            val=result.val,
            test=result.test,
            wall_time=result.wall_time,
            peak_memory_mb=_peak_memory_mb(torch.device(device)),
        )
    return record


def _kpi_metrics(tasks: TaskSet) -> dict[str, str]:
    """Each task's first higher-is-better metric, as its KPI (DTP's accuracy-like signal)."""
    out = {}
    for task in tasks:
        good = [name for name, higher in task.directions.items() if higher]
        if not good:
            raise ValueError(
                f"task {task.name!r} has no higher-is-better metric to serve as DTP's KPI "
                f"(its metrics: {sorted(task.directions)})"
            )
        out[task.name] = good[0]
    return out


def _with_seed(method: str, hparams: Mapping[str, Any], seed: int) -> dict[str, Any]:
    out = dict(hparams)
    if polytask.methods.get(method).stochastic and "seed" not in out:
        out["seed"] = seed
    return out


def _log_epoch(store: ResultsStore, run_id: int, record: Mapping[str, Any]) -> None:
    extra = {"train_losses": record["train_losses"], "weights": record.get("weights")}
    # The validation selection score (lower is better), which `polytask tune` optimises.
    extra["score"] = record["score"]
    store.log_epoch(run_id, record["epoch"], "val", record["val"], record["val_losses"])
    if record["test"]:
        store.log_epoch(run_id, record["epoch"], "test", record["test"])
    store.log_epoch(run_id, record["epoch"], "train", {}, None, extra=extra)


def run_baselines(
    benchmark: str,
    *,
    seeds: Sequence[int],
    arch: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    store: ResultsStore,
    **kwargs: Any,
) -> list[dict[str, Any] | None]:
    """Train (or reuse) the single-task baseline of every task for every seed."""
    bench = benchmarks.get(benchmark)
    out = []
    for task in bench.tasks().names:
        for seed in seeds:
            out.append(
                run(
                    benchmark,
                    method=STL,
                    seed=seed,
                    arch=arch,
                    overrides=overrides,
                    store=store,
                    tasks_subset=[task],
                    **kwargs,
                )
            )
    return out


def baseline_scores(
    store: ResultsStore,
    benchmark: str,
    arch: str,
    split: str,
    tasks: Sequence[str],
    recipe: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Each task's metrics from its finished single-task runs, averaged over seeds
    (``{}`` unless every task has at least one; restricted to ``recipe`` when given)."""
    runs = store.runs(benchmark=benchmark, arch=arch, method=STL, status="finished")
    if recipe is not None:
        # Compare as the store would read the recipe back (its own encoding round trip).
        runs = [r for r in runs if r.recipe == _loads(_dumps(dict(recipe)))]
    scores: dict[str, list[float]] = {}
    covered = set()
    for r in runs:
        task = r.hparams.get("task")
        if task not in tasks:
            continue
        covered.add(task)
        for key, value in (r.val if split == "val" else r.test or {}).items():
            scores.setdefault(key, []).append(value)
    if covered != set(tasks):
        return {}
    return {k: sum(v) / len(v) for k, v in scores.items()}


def _on_rank_zero(fn: Any) -> Any:
    """``fn()`` on rank 0 of a running process group, its result (or its error) on every
    rank; plainly ``fn()`` without one."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as error:  # every rank raises it, none waits forever
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
