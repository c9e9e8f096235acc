"""The ``polytask`` command.

* ``polytask --version``
* ``polytask methods``: the registered balancing methods (name, family, paper, needs,
  stochastic).
* ``polytask demo [--out DIR] [--steps N] [--lr LR] [--paper] [--methods a,b,c]``: CAGrad's
  two-task toy problem for several methods from the paper's starting points; writes
  ``DIR/toy_trajectories.png`` and ``DIR/report.md`` (see :mod:`polytask.demo`).
* ``polytask list methods|archs|benchmarks``.
* ``polytask run BENCHMARK --method M [--arch A] [--seeds 0 1 2] [--epochs N] [--set k=v]``:
  train and record runs in the results store.
* ``polytask baselines BENCHMARK``: the single-task baselines Δm is measured against.
* ``polytask sweep CONFIG.toml [--workers N]``: methods x architectures x seeds on workers
  (``--backend ray [--address ADDR]``: as Ray tasks, on this machine or a cluster).
* ``polytask tune BENCHMARK --method M --trials N [--space KEY=SPEC]``: search a method's
  hyper-parameters with Ray Tune and Optuna on the validation selection score.
* ``polytask report [--store PATH] [--out DIR]``: tables (Markdown, LaTeX, HTML) and plots.

Exit codes: 0 success, 1 a run failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import polytask
from polytask import methods

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from polytask.demo import DEMO_LR, DEMO_STEPS

    parser = argparse.ArgumentParser(
        prog="polytask", description="Multi-task learning for PyTorch: balancing methods."
    )
    parser.add_argument("--version", action="version", version=f"polytask {polytask.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("methods", help="list the registered balancing methods")
    demo = sub.add_parser(
        "demo",
        help="run CAGrad's two-task toy problem for several methods; write a figure and a report",
        description=(
            "Train x in R^2 on CAGrad's two-task toy problem (Liu et al., NeurIPS 2021, "
            "Fig. 1) from the paper's three starting points with each method; write "
            "DIR/toy_trajectories.png and DIR/report.md."
        ),
    )
    demo.add_argument(
        "--out", default="polytask_demo", metavar="DIR", help="output folder (default: %(default)s)"
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"Adam steps per run (default: {DEMO_STEPS}; with --paper: 100000)",
    )
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"Adam learning rate (default: {DEMO_LR}; with --paper: 0.001)",
    )
    demo.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setting: lr 0.001 for 100000 steps (about 1.5 minutes per method "
        "and starting point on a CPU); the default uses a 3x larger step for 30000 steps, "
        "which keeps the paper's qualitative picture (equal weighting trapped in log-valleys)",
    )
    demo.add_argument(
        "--methods",
        default=None,
        metavar="a,b,c",
        help="comma-separated method names (default: those registered among "
        "ew, mgda, pcgrad, cagrad, nash_mtl, imtl_g, upgrad, aligned_mtl, "
        "fairgrad)",
    )
    _add_harness_commands(sub)
    return parser


def _add_harness_commands(sub: argparse._SubParsersAction) -> None:
    listing = sub.add_parser("list", help="list registered methods, architectures or benchmarks")
    listing.add_argument("what", choices=["methods", "archs", "benchmarks"])

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("benchmark", metavar="BENCHMARK", help="see `polytask list benchmarks`")
        p.add_argument("--arch", default=None, help="architecture (default: the benchmark's)")
        p.add_argument("--seeds", type=_seed, nargs="+", default=[0], metavar="SEED")
        p.add_argument("--epochs", type=_positive_int, default=None, help="override the recipe")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe field (repeatable), e.g. --set lr=1e-4 --set batch_size=64",
        )
        p.add_argument(
            "--data",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a data option of the benchmark (repeatable), e.g. --data rho=0.9",
        )
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
        p.add_argument(
            "--nproc",
            type=_positive_int,
            default=None,
            metavar="N",
            help="train each run on N processes of this machine (launches torchrun; with "
            "--device cuda, one GPU each); see docs/distributed.md for several machines",
        )
        p.add_argument("--root", default=None, help="data folder, for data sets read from disk")
        p.add_argument(
            "--store", default="runs/results.sqlite", help="results store (default: %(default)s)"
        )
        p.add_argument("--out", default="runs", help="checkpoints and logs (default: %(default)s)")
        p.add_argument("--progress", action="store_true", help="show progress bars")

    run = sub.add_parser(
        "run",
        help="train one method on a benchmark for some seeds; record the runs",
        description="Train METHOD on BENCHMARK once per seed, selecting the epoch on the "
        "validation split (Δm against the stored single-task baselines when they exist) and "
        "recording every run in the results store. A run already finished is not retrained; "
        "an interrupted one resumes from its checkpoint.",
    )
    common(run)
    run.add_argument("--method", required=True, help="see `polytask list methods`")
    run.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyper-parameter of the method (repeatable), e.g. --hparam c=0.4",
    )
    baselines = sub.add_parser(
        "baselines",
        help="train the single-task baselines of a benchmark (one network per task)",
        description="Train one network per task with the benchmark's model and recipe, per "
        "seed, and record them (method 'stl'); Δm of every run is measured against them.",
    )
    common(baselines)
    sweep = sub.add_parser(
        "sweep",
        help="run a sweep from a TOML file on local worker processes (resumable)",
        description="Run the baselines, then methods x architectures x seeds of CONFIG on a "
        "pool of worker processes sharing the results store. See polytask.train.sweep for "
        "the file's keys; these flags override it.",
    )
    sweep.add_argument("config", metavar="CONFIG.toml")
    sweep.add_argument("--workers", type=_positive_int, default=None)
    sweep.add_argument("--store", default=None)
    sweep.add_argument("--out", default=None)
    sweep.add_argument("--device", default=None)
    sweep.add_argument("--epochs", type=_positive_int, default=None)
    sweep.add_argument(
        "--backend",
        choices=["local", "ray"],
        default=None,
        help="local worker processes, or Ray tasks on this machine or a cluster (needs "
        "pip install 'polytask[ray]'); default: the file's, else local",
    )
    _add_ray_flags(sweep, "job")
    tune = sub.add_parser(
        "tune",
        help="search a method's hyper-parameters with Ray Tune and Optuna (needs polytask[ray])",
        description="Train TRIALS settings of METHOD's hyper-parameters proposed by Optuna "
        "(through Ray Tune), each once per seed, and print the best on the validation selection "
        "score (Δm against the stored single-task baselines by default). Every run is recorded "
        "in the results store; settings already there are not retrained.",
    )
    common(tune)
    tune.add_argument("--method", required=True, help="see `polytask list methods`")
    tune.add_argument("--trials", type=_positive_int, required=True, metavar="N")
    tune.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a searched hyper-parameter (repeatable): uniform(LOW, HIGH), loguniform(LOW, "
        "HIGH), int(LOW, HIGH) or choice(V1, V2, ...); default: the method's default space",
    )
    tune.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyper-parameter held fixed in every trial (repeatable)",
    )
    tune.add_argument(
        "--search-seed", type=_seed, default=0, help="the Optuna sampler's seed (default: 0)"
    )
    _add_ray_flags(tune, "trial")
    report = sub.add_parser(
        "report",
        help="render tables and plots from the results store",
        description="Write report.md, report.tex, report.html (self-contained) and PNG plots "
        "for every benchmark in the store (or those given).",
    )
    report.add_argument("--store", default="runs/results.sqlite")
    report.add_argument("--out", default="runs/report", help="output folder (default: %(default)s)")
    report.add_argument("--benchmark", action="append", default=None, dest="benchmarks")


def _add_ray_flags(parser: argparse.ArgumentParser, unit: str) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join ('auto': the one `ray start` began on this machine); "
        "default: start Ray on this machine",
    )
    parser.add_argument(
        "--num-cpus",
        type=_positive_float,
        default=None,
        help=f"CPUs each Ray {unit} reserves (default: 1)",
    )


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {value} must be non-negative")
    return value


def _pairs(items: Sequence[str], what: str, *, literal: bool) -> dict[str, object]:
    import ast

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} must look like KEY=VALUE")
        parsed: object = value
        if literal:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
        out[key.strip()] = parsed
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive finite number")
    return value


def _methods_table() -> Table:
    table = Table(title=f"polytask {polytask.__version__}: registered balancing methods")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("family")
    table.add_column("paper")
    table.add_column("needs")
    table.add_column("stochastic")
    for name in methods.available():
        cls = methods.get(name)
        table.add_row(
            name,
            cls.family,
            cls.paper,
            ", ".join(sorted(cls.needs)) or "-",
            "yes" if cls.stochastic else "no",
        )
    return table


def _cmd_methods(console: Console) -> int:
    console.print(_methods_table())
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from polytask.data import toy
    from polytask.demo import DEMO_LR, DEMO_STEPS, ON_PARETO_DISTANCE, default_methods, run_demo

    if args.methods is None:
        names = default_methods()
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names:
        console.print("[red]error:[/red] no method to run")
        return 2
    for name in names:
        try:
            methods.get(name)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            return 2
        reason = toy.toy_support(name)
        if reason is not None:
            console.print(
                f"[red]error:[/red] cannot run {name} on the toy problem: {escape(reason)}"
            )
            return 2

    if args.steps is None:
        args.steps = toy.PAPER_STEPS if args.paper else DEMO_STEPS
    if args.lr is None:
        args.lr = toy.PAPER_LR if args.paper else DEMO_LR
    console.print(
        f"CAGrad's toy problem: {len(names)} method(s) x {len(toy.STARTS)} starting points, "
        f"Adam lr {args.lr:g}, {args.steps} steps"
    )
    with console.status("running") as status:

        def progress(name: str, i: int, total: int) -> None:
            status.update(f"run {i + 1}/{total}: {name}")

        result = run_demo(
            args.out, method_names=names, steps=args.steps, lr=args.lr, progress=progress
        )

    table = Table(title="CAGrad's toy problem: where each method ends")
    table.add_column("method", style="bold cyan", no_wrap=True)
    table.add_column("on Pareto set", justify="right")
    table.add_column("mean f1", justify="right")
    table.add_column("mean f2", justify="right")
    table.add_column("max stationarity", justify="right")
    table.add_column("ms / step", justify="right")
    for name, runs in result.runs.items():
        on = sum(r.distance_to_pareto_set < ON_PARETO_DISTANCE for r in runs)
        f1 = sum(r.final_losses[0] for r in runs) / len(runs)
        f2 = sum(r.final_losses[1] for r in runs) / len(runs)
        stat = max(r.stationarity for r in runs)
        ms = 1e3 * sum(r.seconds for r in runs) / sum(max(r.steps, 1) for r in runs)
        table.add_row(
            name, f"{on}/{len(runs)}", f"{f1:.3f}", f"{f2:.3f}", f"{stat:.1e}", f"{ms:.3f}"
        )
    console.print(table)
    console.print(f"figure: {result.figure}")
    console.print(f"report: {result.report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polytask`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    console = Console()
    if args.command == "methods":
        return _cmd_methods(console)
    if args.command == "demo":
        return _cmd_demo(args, console)
    handlers = {
        "list": _cmd_list,
        "run": _cmd_run,
        "baselines": _cmd_run,
        "sweep": _cmd_sweep,
        "tune": _cmd_tune,
        "report": _cmd_report,
    }
    if args.command in handlers:
        try:
            return handlers[args.command](args, console)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            # Bad names, values or configuration: the message says what to change.
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            Console(stderr=True, soft_wrap=True).print(
                f"[red]error:[/red] {escape(str(message))}", highlight=False
            )
            return 2
    parser.print_help()
    return 0


def _cmd_list(args: argparse.Namespace, console: Console) -> int:
    if args.what == "methods":
        return _cmd_methods(console)
    if args.what == "archs":
        table = Table(title="registered architectures")
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("paper")
        table.add_column("features mode")
        for name in polytask.archs.available():
            cls = polytask.archs.get(name)
            table.add_row(name, cls.paper, "yes" if cls.has_shared_representation else "no")
        console.print(table)
        return 0
    from polytask.data import benchmark as benchmarks

    table = Table(title="registered benchmarks")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("summary")
    table.add_column("architectures")
    table.add_column("data")
    for name in benchmarks.available():
        b = benchmarks.get(name)
        table.add_row(
            name, b.summary, ", ".join(b.archs), "--root DIR" if b.needs_root else "ships"
        )
    console.print(table)
    return 0


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from polytask.train.launch import exit_worker, launch_torchrun, torchrun_process_group

    if args.nproc is not None and args.nproc > 1 and not _under_torchrun():
        return launch_torchrun(args.argv, args.nproc)
    if not _under_torchrun():
        return _cmd_run_here(args, console)
    with torchrun_process_group(args.device) as (rank, device):
        args.device = device
        # Every rank trains; rank 0 alone talks and writes the store.
        code = _cmd_run_here(args, console if rank == 0 else Console(quiet=True))
    exit_worker(code)


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cmd_run_here(args: argparse.Namespace, console: Console) -> int:
    from polytask.data import benchmark as benchmarks
    from polytask.results.store import ResultsStore
    from polytask.train.runner import STL, RunSetupError, run

    bench = benchmarks.get(args.benchmark)
    arch = bench.check_arch(args.arch)
    overrides = _pairs(args.set, "--set", literal=False)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    bench.recipe.override(overrides)  # fail before any training on a bad key or value
    data = _pairs(args.data, "--data", literal=True)
    bench.check_options(data)  # before any training, as the recipe
    store = ResultsStore(args.store)
    if args.command == "baselines":
        jobs = [(STL, seed, {}, [t]) for t in bench.tasks().names for seed in args.seeds]
    else:
        hparams = _pairs(args.hparam, "--hparam", literal=True)
        polytask.methods.create(args.method, len(bench.tasks()), **hparams)  # validate early
        jobs = [(args.method, seed, hparams, None) for seed in args.seeds]
    failed = 0
    for method, seed, hparams, subset in jobs:
        label = f"{args.benchmark}/{arch}/{method}/seed {seed}" + (
            f" ({subset[0]})" if subset else ""
        )
        console.print(f"[bold]{label}[/bold]")
        try:
            record = run(
                args.benchmark,
                method=method,
                seed=seed,
                arch=arch,
                hparams=hparams,
                overrides=overrides,
                store=store,
                out_dir=args.out,
                device=args.device,
                root=args.root,
                data_options=data,
                tasks_subset=subset,
                progress=args.progress,
            )
        except RunSetupError:
            raise
        except Exception as exc:  # the run failed; the store has its traceback
            console.print(
                f"  [red]failed:[/red] {escape(f'{type(exc).__name__}: {exc}')}", highlight=False
            )
            failed += 1
            continue
        if record is None:
            console.print("  already in the store (finished, or running elsewhere): skipped")
            continue
        test = ", ".join(f"{k} {v:.4g}" for k, v in record["test"].items())
        console.print(
            f"  best epoch {record['best_epoch']} (on validation); test: {test}; "
            f"{record['wall_time']:.1f} s"
        )
    console.print(f"results store: {args.store}")
    return 1 if failed else 0


def _cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from polytask.train.sweep import load_config, run_sweep

    overrides = {
        "workers": args.workers,
        "store": args.store,
        "out": args.out,
        "device": args.device,
        "backend": args.backend,
        "address": args.address,
        "num_cpus": args.num_cpus,
    }
    config = load_config(args.config, overrides)
    if args.epochs is not None:
        config.recipe["epochs"] = args.epochs
    console.print(
        f"sweep: {len(config.benchmarks)} benchmark(s) x {len(config.methods)} method(s) x "
        f"{len(config.seeds)} seed(s) "
        + ("as Ray tasks" if config.backend == "ray" else f"on {config.workers} worker(s)")
        + f"; store {config.store}"
    )

    def show(label: str, outcome: str) -> None:
        colour = "red" if outcome.startswith("failed") else "green"
        console.print(f"  [{colour}]{escape(outcome)}[/{colour}] {escape(label)}", highlight=False)

    results = run_sweep(config, on_result=show)
    failed = sum(outcome.startswith("failed") for _, outcome in results)
    console.print(f"{len(results) - failed} of {len(results)} jobs done or already done")
    return 1 if failed else 0


def _cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from polytask.train.ray_backend import RayNotInstalledError
    from polytask.train.tune import tune

    if args.nproc is not None and args.nproc > 1:
        raise ValueError(
            f"--nproc {args.nproc}: a tune trial trains in one process; give it more threads "
            "with --num-cpus instead"
        )
    overrides = _pairs(args.set, "--set", literal=False)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    space = _pairs(args.space, "--space", literal=False)
    try:
        result = tune(
            args.benchmark,
            method=args.method,
            trials=args.trials,
            space=space or None,
            hparams=_pairs(args.hparam, "--hparam", literal=True),
            seeds=args.seeds,
            arch=args.arch,
            overrides=overrides,
            data_options=_pairs(args.data, "--data", literal=True),
            store=args.store,
            out_dir=args.out,
            device=args.device,
            root=args.root,
            address=args.address,
            num_cpus=1 if args.num_cpus is None else args.num_cpus,
            search_seed=args.search_seed,
            progress=args.progress,
        )
    except RayNotInstalledError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    table = Table(title=f"{args.method} on {args.benchmark}", caption=f"score: {result.objective}")
    table.add_column("trial", justify="right")
    table.add_column("hyper-parameters")
    table.add_column("score", justify="right")
    for i, trial in enumerate(result.trials):
        score = "failed" if trial.score is None else f"{trial.score:.4g}"
        table.add_row(str(i), escape(_hparams_text(trial.hparams)), score)
    console.print(table)
    for trial in result.trials:
        if trial.error is not None:
            console.print(f"  [red]failed:[/red] {escape(trial.error)}", highlight=False)
    console.print(f"results store: {args.store}")
    if result.best is None:
        console.print("[red]every trial failed[/red]")
        return 1
    console.print(
        f"best: {escape(_hparams_text(result.best.hparams))}  score {result.best.score:.4g}",
        highlight=False,
    )
    return 0


def _hparams_text(hparams: dict[str, object]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in sorted(hparams.items()))


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from polytask.results import ResultsStore, write_report

    if not Path(args.store).is_file():
        raise FileNotFoundError(f"no results store at {args.store}; run `polytask run` first")
    paths = write_report(ResultsStore(args.store), args.out, benchmarks=args.benchmarks)
    for kind, path in paths.items():
        if kind in ("markdown", "latex", "html"):
            console.print(f"{kind}: {path}")
    console.print(f"plots: {len(paths) - 3} PNG file(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
