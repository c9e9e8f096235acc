"""Hyper-parameter search for a balancing method with Ray Tune and an Optuna searcher.

:func:`tune` trains ``trials`` settings of a method's hyper-parameters on a benchmark, each
for every seed, the settings proposed by Optuna's TPE sampler through Ray Tune
(``ray.tune.search.optuna.OptunaSearch``; Akiba et al., "Optuna: A Next-generation
Hyperparameter Optimization Framework", KDD 2019). Trials run as Ray Tune trials on this
machine or on a cluster (``address``), as many at once as its resources allow.

The objective is the number the runner's model selection already minimises: the recipe's
validation selection score at the selected epoch (with the default ``select = "delta_m"``,
the validation Δm in percent against the stored single-task baselines; lower is better),
averaged over the seeds. Only validation numbers are searched on, never test.

Every trial's runs are ordinary runs of the results store, hyper-parameters included (they
are part of a run's key), so ``polytask report`` shows each setting as a row. A setting the
store already holds finished is not retrained: its stored score is reused, so a search
rerun with the same searcher seed costs nothing. Paths are made absolute before the trials
get them (Ray Tune runs each trial in a folder of its own); on machines that share no file
system, use a PostgreSQL store.

Search spaces are ``{name: SPEC}`` with SPEC one of ``uniform(LOW, HIGH)``,
``loguniform(LOW, HIGH)``, ``int(LOW, HIGH)`` (both ends included) and ``choice(V1, V2,
...)`` (Python literals). :data:`DEFAULT_SPACES` holds one for the methods whose paper
names a range for a hyper-parameter it tunes; any other method needs an explicit space.
"""

from __future__ import annotations

import ast
import datetime
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polytask
from polytask.data import benchmark as benchmarks
from polytask.results.store import ResultsStore, RunRecord, RunSpec

__all__ = ["DEFAULT_SPACES", "Space", "Trial", "TuneError", "TuneResult", "parse_space", "tune"]


class TuneError(polytask.errors.PolytaskError, ValueError):
    """A search cannot start as asked (nothing was trained); the message says why."""


#: Default search spaces, where the method's paper gives the range of a tuned
#: hyper-parameter (see each method's docstring for the source).
DEFAULT_SPACES: dict[str, dict[str, str]] = {
    # CAGrad (Liu et al., NeurIPS 2021): the radius c, whose convergence result needs c < 1;
    # the paper's settings lie in [0.1, 0.9] (0.4 on NYUv2 and Cityscapes).
    "cagrad": {"c": "uniform(0.1, 0.9)"},
    # GradNorm (Chen et al., ICML 2018): the asymmetry alpha; the paper reports that alpha in
    # [0.5, 3] works (1.5 on NYUv2).
    "gradnorm": {"alpha": "uniform(0.5, 3.0)"},
    # FAMO (Liu et al., NeurIPS 2023): the logits' weight decay gamma, 1e-3 (NYUv2, CelebA,
    # QM9) or 1e-2 (Cityscapes) in the official scripts; searched on a log scale.
    "famo": {"gamma": "loguniform(1e-4, 1e-2)"},
}

_KINDS = ("uniform", "loguniform", "int", "choice")
_SPEC_FORMS = "uniform(LOW, HIGH), loguniform(LOW, HIGH), int(LOW, HIGH) or choice(V1, V2, ...)"
#: Seconds between looks at a run that another trial is training (the same setting twice).
_WAIT_S = 5.0


@dataclass(frozen=True)
class Space:
    """One hyper-parameter's search domain: ``kind`` in uniform, loguniform, int, choice."""

    kind: str
    values: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(map(repr, self.values))})"

    def to_tune(self) -> Any:
        from ray import tune as ray_tune

        if self.kind == "uniform":
            return ray_tune.uniform(*self.values)
        if self.kind == "loguniform":
            return ray_tune.loguniform(*self.values)
        if self.kind == "int":
            low, high = self.values
            return ray_tune.randint(low, high + 1)  # Tune's upper bound is exclusive
        return ray_tune.choice(list(self.values))


def parse_space(name: str, spec: str | Space) -> Space:
    """Read ``spec`` (e.g. ``"uniform(0.1, 0.9)"``) for hyper-parameter ``name``."""
    if isinstance(spec, Space):
        return spec
    where = f"search space {name}={spec}"
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _KINDS
        and not node.keywords
    ):
        raise TuneError(
            f"{where}: SPEC must be {_SPEC_FORMS}; to fix a value instead, pass it as a "
            f"hyper-parameter (--hparam {name}=VALUE)"
        )
    try:
        values = tuple(ast.literal_eval(arg) for arg in node.args)
    except ValueError:
        raise TuneError(f"{where}: the arguments must be literals (numbers, strings)") from None
    kind = node.func.id
    if kind == "choice":
        if len(set(map(repr, values))) < 2:
            raise TuneError(f"{where}: choice needs at least two different values")
        return Space(kind, values)
    numbers = (int,) if kind == "int" else (int, float)
    if len(values) != 2 or any(
        isinstance(v, bool) or not isinstance(v, numbers) or not math.isfinite(v) for v in values
    ):
        what = "integers" if kind == "int" else "finite numbers"
        raise TuneError(f"{where}: {kind} takes two {what}, LOW and HIGH")
    low, high = values
    if not low < high:
        raise TuneError(f"{where}: LOW {low} must be below HIGH {high}")
    if kind == "loguniform" and low <= 0:
        raise TuneError(f"{where}: loguniform needs LOW > 0")
    return Space(kind, (float(low), float(high)) if kind != "int" else (low, high))


@dataclass(frozen=True)
class Trial:
    """One searched setting: its hyper-parameters, its score (mean over the seeds, lower is
    better; ``None`` when it failed) and its error."""

    hparams: dict[str, Any]
    score: float | None
    error: str | None = None


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` returns: every trial, and the best one (``None`` if all failed)."""

    trials: list[Trial]
    best: Trial | None
    objective: str


@dataclass(frozen=True)
class _Setup:
    """What every trial needs besides its hyper-parameters (sent to the trials once)."""

    benchmark: str
    method: str
    arch: str
    seeds: tuple[int, ...]
    hparams: dict[str, Any]
    overrides: dict[str, Any]
    data_options: dict[str, Any]
    store: str
    out_dir: str
    device: str
    root: str | None
    threads: int
    progress: bool


def tune(
    benchmark: str,
    *,
    method: str,
    trials: int,
    space: Mapping[str, str | Space] | None = None,
    hparams: Mapping[str, Any] | None = None,
    seeds: Sequence[int] = (0,),
    arch: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    store: str | Path = "runs/results.sqlite",
    out_dir: str | Path = "runs",
    device: str = "cpu",
    root: str | None = None,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    search_seed: int = 0,
    progress: bool = False,
) -> TuneResult:
    """Search ``method``'s hyper-parameters on ``benchmark`` with ``trials`` Ray Tune trials.

    Args:
        space: {hyper-parameter: SPEC} to search (default: :data:`DEFAULT_SPACES`).
        hparams: hyper-parameters held fixed in every trial.
        seeds: every trial trains once per seed; its score is the mean over them.
        overrides, data_options, arch, device, root: as for :func:`polytask.train.runner.run`.
        store, out_dir: the results store (a path or a ``postgresql://`` URL) and the folder
            of checkpoints, logs and Ray Tune's own trial records (``OUT/tune``).
        address: the Ray cluster to join (``"auto"``: the one ``ray start`` began on this
            machine); default: start Ray here.
        num_cpus, num_gpus: what each trial reserves (``num_gpus``: 1 by default with
            ``device="cuda"``, which then means the trial's own GPU).
        search_seed: the Optuna sampler's seed (the same seed proposes the same settings).

    Raises:
        TuneError: no search space for the method, a bad space or setting, or missing
            single-task baselines (nothing is trained then).
        RayNotInstalledError: Ray is not installed (``pip install 'polytask[ray]'``).
    """
    from polytask.train.ray_backend import connect, gpus_per_job, import_ray, resources_problem
    from polytask.train.runner import baseline_scores

    ray = import_ray("polytask tune")
    bench = benchmarks.get(benchmark)
    arch = bench.check_arch(arch)
    overrides, data_options = dict(overrides or {}), dict(data_options or {})
    recipe = bench.recipe.override(overrides)
    bench.check_options(data_options)
    polytask.methods.get(method)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise TuneError(f"trials={trials!r} must be a positive integer")
    if not seeds:
        raise TuneError("seeds is empty; give at least one seed")
    domains = _check_space(method, space, dict(hparams or {}), len(bench.tasks()))
    problem = resources_problem(device, num_cpus, num_gpus)
    if problem is not None:
        raise TuneError(problem)
    gpus = gpus_per_job(device, num_gpus)
    store_path = _absolute(str(store))
    names = bench.tasks().names
    if recipe.select == "delta_m" and not baseline_scores(
        ResultsStore(store_path),
        benchmark,
        arch,
        "val",
        names,
        _recipe_record(recipe, data_options),
    ):
        raise TuneError(
            f"tuning on the validation Δm needs the single-task baselines of {benchmark} "
            f"(architecture {arch!r}, this recipe) in {store}: run `polytask baselines "
            f"{benchmark}` with the same --arch/--set/--epochs/--data first, or tune on the "
            "validation loss with --set select=loss"
        )
    setup = _Setup(
        benchmark=benchmark,
        method=method,
        arch=arch,
        seeds=tuple(seeds),
        hparams=dict(hparams or {}),
        overrides=overrides,
        data_options=data_options,
        store=store_path,
        out_dir=str(Path(out_dir).resolve()),
        device=device,
        root=None if root is None else str(Path(root).resolve()),
        threads=max(1, int(num_cpus)),
        progress=progress,
    )
    started = connect(address)
    try:
        grid = _fit(setup, domains, trials, num_cpus, gpus, search_seed)
    finally:
        if started:
            ray.shutdown()
    done = [t for t in grid if t.score is not None]
    best = min(done, key=lambda t: t.score, default=None)  # type: ignore[arg-type, return-value]
    return TuneResult(trials=grid, best=best, objective=_objective(recipe.select))


def _fit(
    setup: _Setup,
    domains: Mapping[str, Space],
    trials: int,
    num_cpus: float,
    gpus: float,
    search_seed: int,
) -> list[Trial]:
    from ray import tune as ray_tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, setup=setup), {"cpu": num_cpus, "gpu": gpus}
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    tuner = ray_tune.Tuner(
        trainable,
        param_space={name: space.to_tune() for name, space in domains.items()},
        tune_config=ray_tune.TuneConfig(
            metric="score",
            mode="min",
            num_samples=trials,
            search_alg=OptunaSearch(seed=search_seed),
            # A trial's process imports torch and polytask once for all the trials it runs.
            reuse_actors=True,
        ),
        run_config=ray_tune.RunConfig(
            name=f"{setup.benchmark}-{setup.method}-{stamp}",
            storage_path=str(Path(setup.out_dir) / "tune"),
            verbose=0,
        ),
    )
    out = []
    for result in tuner.fit():
        # A trial whose worker died before its first report has no config in its result.
        params = {k: _plain(v) for k, v in (result.config or {}).items() if k in domains}
        hparams = {**setup.hparams, **params}
        if result.error is not None:
            # The run's own exception, not Ray's wrapper with its traceback (the store has it).
            cause = getattr(result.error, "cause", None) or result.error
            out.append(Trial(hparams, None, f"{type(cause).__name__}: {cause}"))
        else:
            out.append(Trial(hparams, float(result.metrics["score"])))
    return out


def _trial(params: dict[str, Any], setup: _Setup) -> None:
    """One Ray Tune trial: train (or reuse) the setting for every seed; report the mean."""
    import torch
    from ray import tune as ray_tune

    torch.set_num_threads(setup.threads)
    hparams = {**setup.hparams, **{k: _plain(v) for k, v in params.items()}}
    store = ResultsStore(setup.store)
    scores = [_seed_score(setup, store, hparams, seed) for seed in setup.seeds]
    ray_tune.report({"score": sum(scores) / len(scores)})


def _seed_score(setup: _Setup, store: ResultsStore, hparams: dict[str, Any], seed: int) -> float:
    from polytask.train.runner import run

    while True:
        record = run(
            setup.benchmark,
            method=setup.method,
            seed=seed,
            arch=setup.arch,
            hparams=hparams,
            overrides=setup.overrides,
            store=store,
            out_dir=setup.out_dir,
            device=setup.device,
            root=setup.root,
            data_options=setup.data_options,
            progress=setup.progress,
        )
        key = record["key"] if record is not None else _key(setup, hparams, seed)
        rows = store.runs(key=key)
        if not rows:
            raise RuntimeError(f"the store holds no run with key {key}, which run() skipped")
        finished = [r for r in rows if r.status == "finished"]
        if finished:
            return _stored_score(store, finished[-1])
        # Another trial trains this very setting (the searcher proposed it twice): wait.
        time.sleep(_WAIT_S)


def _stored_score(store: ResultsStore, run: RunRecord) -> float:
    """The selection score of a finished run at its selected epoch, as the runner stored it."""
    for epoch in store.epochs(run.id, "train"):
        if epoch["epoch"] == run.best_epoch and "score" in (epoch["extra"] or {}):
            return float(epoch["extra"]["score"])
    raise TuneError(
        f"run {run.id} ({run.method} {run.hparams}, seed {run.seed}) in {store.location} was "
        "stored without its selection score (by an older polytask); tune into another store "
        "or delete that run"
    )


def _key(setup: _Setup, hparams: Mapping[str, Any], seed: int) -> str:
    """The store key :func:`polytask.train.runner.run` gives a multi-task run of ``setup``."""
    bench = benchmarks.get(setup.benchmark)
    recipe = bench.recipe.override(setup.overrides)
    record = _recipe_record(recipe, setup.data_options)
    return RunSpec(setup.benchmark, setup.arch, setup.method, seed, dict(hparams), record).key


def _recipe_record(recipe: Any, data_options: Mapping[str, Any]) -> dict[str, Any]:
    # As runner.run records a run's recipe (the test of this module checks that they agree).
    return {**asdict(recipe), "data": dict(data_options)}


def _check_space(
    method: str, space: Mapping[str, str | Space] | None, fixed: dict[str, Any], k: int
) -> dict[str, Space]:
    if space is None:
        if method not in DEFAULT_SPACES:
            raise TuneError(
                f"method {method!r} has no default search space (polytask has one for "
                f"{sorted(DEFAULT_SPACES)}); give one, e.g. --space NAME=uniform(LOW, HIGH)"
            )
        space = DEFAULT_SPACES[method]
    if not space:
        raise TuneError(f"the search space of {method!r} is empty; name a hyper-parameter")
    domains = {name: parse_space(name, spec) for name, spec in space.items()}
    both = sorted(set(domains) & set(fixed))
    if both:
        raise TuneError(f"{both} are both searched and fixed; give each only once")
    for name, domain in domains.items():
        # The bounds (or every choice): a setting the method refuses fails before any trial.
        for value in domain.values:
            try:
                polytask.methods.create(method, k, **{**fixed, name: value})
            except (TypeError, ValueError) as exc:
                raise TuneError(f"search space {name}={domain} for {method}: {exc}") from None
    return domains


def _absolute(location: str) -> str:
    if location.startswith(("postgresql://", "postgres://")):
        return location
    return str(Path(location).resolve())


def _plain(value: Any) -> Any:
    """A Python scalar for a NumPy one (the store writes hyper-parameters as JSON)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _objective(select: str) -> str:
    if select == "delta_m":
        return "validation Δm (%) against the single-task baselines, lower is better"
    if select == "loss":
        return "validation loss (sum over tasks), lower is better"
    return f"validation {select} (negated when higher is better), lower is better"
