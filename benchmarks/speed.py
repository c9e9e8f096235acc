"""Speed of every balancing method relative to equal weighting, side by side in one run.

For a small CNN (two conv layers with 32 and 64 channels, a linear layer to 256 features,
36x36 inputs, batch 256, ten-class heads) and an MLP (500-512-256, batch 1024, binary
heads), at K = 2, 10 and 40 tasks, this script times one training step (zero the grads,
forward, balance and backward; the optimizer's update is the same for every method and is
left out) of:

* equal weighting (EW): ``losses.sum().backward()``, the reference (ratio 1);
* a plain loop of K backward passes (``loss_k.backward(retain_graph=True)``, copy the
  shared gradient out, K times), the baseline a gradient method should not be slower than;
* every method registered in :func:`polytask.methods.available`, gradient methods both in
  ``mode="params"`` and ``mode="features"``;
* torchjd's ``mtl_backward`` + ``jac_to_grad`` with UPGrad (vmap-batched by default, and
  with ``parallel_chunk_size=1``), and LibMTL's MGDA, PCGrad and GradVac weightings
  (params mode) and MGDA with ``rep_grad`` (features mode), on the same model and batch.

Rows are timed round-robin (each repeat runs every row once, the starting row rotating),
so machine noise hits all rows alike; the table shows the median over the repeats, after
warm-up calls. It also times the Jacobian engine's strategies and, separately, each
gradient method's own work given a precomputed Jacobian / Gramian at K = 10.

Usage::

    python benchmarks/speed.py                      # full run, writes docs/speed.md
    python benchmarks/speed.py --quick --out /tmp/speed.md   # small shapes, < 60 s (CI)

The markdown file is written entirely by this script: never edit the numbers by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import io
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import polytask
from polytask.autograd import JacobianEngine, gramian, jacobian
from polytask.methods import GradientMethod, GramianMethod, LossMethod
from polytask.methods.context import CONTEXT

ROOT = Path(__file__).resolve().parent.parent

# -- the models ------------------------------------------------------------------------


@dataclass
class Problem:
    """A shared encoder, K heads, one batch and a forward that returns per-task losses."""

    name: str
    encoder: nn.Module
    heads: nn.ModuleList
    x: Tensor
    ys: list[Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def shared(self) -> list[Tensor]:
        return list(self.encoder.parameters())

    def parameters(self) -> list[Tensor]:
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def forward(
        self, reduction: str = "mean", views: Callable[[Tensor], list[Tensor]] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The features and the task losses; with ``views`` (a method's ``task_views``,
        RotoGrad's rotations) head k reads view k of the features."""
        features = self.encoder(self.x)
        inputs = [features] * self.num_tasks if views is None else views(features)
        return features, [
            self.loss(h(z), y, reduction=reduction) for h, z, y in zip(self.heads, inputs, self.ys)
        ]


def _bce(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), y, reduction=reduction)


def make_problem(model: str, k: int, *, quick: bool, seed: int = 0) -> Problem:
    """The benchmark's models; ``quick`` keeps their structure at 1/8 of the widths."""
    torch.manual_seed(seed)
    s = 8 if quick else 1
    if model == "cnn":
        batch, side = (8, 12) if quick else (256, 36)
        c1, c2, d = 32 // s, 64 // s, 256 // s
        encoder = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (side // 4) ** 2, d),
            nn.ReLU(),
        )
        heads = nn.ModuleList(nn.Linear(d, 10) for _ in range(k))
        x = torch.randn(batch, 3, side, side)
        ys = [torch.randint(0, 10, (batch,)) for _ in range(k)]
        return Problem("cnn", encoder, heads, x, ys, F.cross_entropy)
    if model == "mlp":
        batch = 64 if quick else 1024
        encoder = nn.Sequential(
            nn.Linear(500 // s, 512 // s), nn.ReLU(), nn.Linear(512 // s, 256 // s), nn.ReLU()
        )
        heads = nn.ModuleList(nn.Linear(256 // s, 1) for _ in range(k))
        x = torch.randn(batch, 500 // s)
        ys = [torch.randint(0, 2, (batch,)).float() for _ in range(k)]
        return Problem("mlp", encoder, heads, x, ys, _bce)
    raise ValueError(f"unknown model {model!r}; use 'cnn' or 'mlp'")


def describe(p: Problem) -> str:
    """One line naming the layers, read from the modules themselves."""
    parts = []
    for layer in p.encoder:
        if isinstance(layer, nn.Conv2d):
            parts.append(
                f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}"
                f"({layer.in_channels}→{layer.out_channels})"
            )
        elif isinstance(layer, nn.Linear):
            parts.append(f"linear({layer.in_features}→{layer.out_features})")
        elif isinstance(layer, nn.ReLU):
            parts.append("ReLU")
        elif isinstance(layer, nn.MaxPool2d):
            parts.append("maxpool2")
    head = p.heads[0]
    loss = "cross-entropy" if p.loss is F.cross_entropy else "binary cross-entropy"
    return (
        f"{'-'.join(parts)}; heads linear({head.in_features}→{head.out_features}), {loss}; "
        f"inputs {tuple(p.x.shape[1:])}, batch {p.x.shape[0]}; "
        f"{sum(t.numel() for t in p.shared())} shared parameters"
    )


# -- the rows --------------------------------------------------------------------------


@dataclass
class Row:
    """One timed configuration: ``step()`` runs a whole training step but the update."""

    label: str
    group: str  # "reference", "polytask", "torchjd", "libmtl"
    kind: str  # "ew", "loop", "loss", "params", "features"
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and self.error is None else None


def _ew_step(p: Problem) -> Callable[[], None]:
    def step() -> None:
        p.zero_grad()
        _, losses = p.forward()
        torch.stack(losses).sum().backward()

    return step


def _loop_step(p: Problem) -> Callable[[], None]:
    shared = p.shared()
    total = sum(t.numel() for t in shared)

    def step() -> None:
        p.zero_grad()
        _, losses = p.forward()
        jac = torch.empty(len(losses), total)
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=k < len(losses) - 1)
            jac[k] = torch.cat([t.grad.reshape(-1) for t in shared])
            for t in shared:
                t.grad = None
        offset = 0
        direction = jac.sum(0)
        for t in shared:
            t.grad = direction[offset : offset + t.numel()].view_as(t).clone()
            offset += t.numel()

    return step


def _method_step(p: Problem, method: polytask.methods.Method, mode: str) -> Callable[[], None]:
    """One step of ``method``, with the context it declares (its example values; per-sample
    losses from the batch) and, where the method needs it, the forward after the step."""
    shared = p.shared()
    fixed = {k: CONTEXT[k].example(p.num_tasks) for k in method.needs if k != "sample_losses"}
    per_sample = "sample_losses" in method.needs
    views = method.task_views if method.has_task_views else None

    def step() -> None:
        p.zero_grad()
        ctx = dict(fixed)
        if per_sample:
            features, samples = p.forward(reduction="none", views=views)
            ctx["sample_losses"] = samples
            losses = [s.mean() for s in samples]
        else:
            features, losses = p.forward(views=views)
        method.backward(
            torch.stack(losses), shared_params=shared, features=features, mode=mode, **ctx
        )
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(torch.stack(p.forward()[1]))

    return step


#: Extra rows: a method with other hyper-parameters than its defaults (given the problem).
VARIANTS: dict[str, list[Callable[[Problem], dict[str, Any]]]] = {
    # Its cost is K matrix exponentials of the rotated block a step: rotating an eighth of
    # the representation's coordinates is the official code's remedy for wide ones.
    "rotograd": [lambda p: {"rotation_size": p.heads[0].in_features // 8}],
}


def _method_kwargs(cls: type, strategy: str | None, p: Problem) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cls.stochastic:
        kw["seed"] = 0
    if strategy is not None and issubclass(cls, GradientMethod):
        kw["jacobian_strategy"] = strategy
    if cls.has_task_views:
        # Built with the representation's size, as a training loop must (RotoGrad).
        kw["latent_size"] = p.heads[0].in_features
    return kw


def polytask_rows(
    p: Problem, strategies: dict[str, str], names: list[str] | None = None
) -> list[Row]:
    rows = []
    for name in polytask.methods.available() if names is None else names:
        cls = polytask.methods.get(name)
        if issubclass(cls, LossMethod):
            modes = ["loss"]
        elif issubclass(cls, GradientMethod):
            supported = getattr(cls, "modes", frozenset({"params", "features"}))
            modes = [m for m in ("params", "features") if m in supported]
        else:
            continue
        for mode in modes:
            for variant in [{}, *(make(p) for make in VARIANTS.get(name, []))]:
                label = name if mode == "loss" else f"{name} [{mode}]"
                label += "".join(f" {key}={value}" for key, value in variant.items())
                row = Row(label, "polytask", mode, step=lambda: None)
                if p.num_tasks < cls.min_tasks:
                    row.error = f"n/a (needs K >= {cls.min_tasks})"
                else:
                    try:
                        strategy = strategies.get("features" if mode == "features" else "params")
                        kwargs = {**_method_kwargs(cls, strategy, p), **variant}
                        method = polytask.methods.create(name, p.num_tasks, **kwargs)
                        row.step = _method_step(p, method, "params" if mode == "loss" else mode)
                    except Exception as exc:  # a broken method must not stop the benchmark
                        row.error = f"error: {type(exc).__name__}: {exc}"[:100]
                rows.append(row)
    return rows


def _load_libmtl_weighting() -> types.ModuleType | None:
    """LibMTL's package ``__init__`` imports torchvision; load only ``LibMTL.weighting``."""
    if "LibMTL.weighting" in sys.modules:
        return sys.modules["LibMTL.weighting"]
    try:
        spec = importlib.util.find_spec("LibMTL")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("LibMTL.weighting")
    except Exception:
        return None


def _libmtl_weighting(
    module: types.ModuleType, cls_name: str, p: Problem, rep_grad: bool
) -> nn.Module:
    base = getattr(module, cls_name)
    encoder = p.encoder
    k = p.num_tasks

    class Weighting(base):  # type: ignore[misc, valid-type]
        """The attributes LibMTL's trainer would set on its model."""

        def __init__(self) -> None:
            super().__init__()
            self.task_num = k
            self.task_name = [f"task{i}" for i in range(k)]
            self.device = torch.device("cpu")
            self.rep_grad = rep_grad
            self.epoch = 0

        def get_share_params(self):
            return encoder.parameters()

        def zero_grad_share_params(self) -> None:
            encoder.zero_grad(set_to_none=False)

    weighting = Weighting()
    weighting.init_param()
    return weighting


def libmtl_rows(p: Problem) -> list[Row]:
    module = _load_libmtl_weighting()
    specs = [
        ("MGDA", False, {"mgda_gn": "none"}),
        ("PCGrad", False, {}),
        ("GradVac", False, {"beta": 0.5}),
        ("MGDA", True, {"mgda_gn": "none"}),
    ]
    rows = []
    for cls_name, rep_grad, kwargs in specs:
        kind = "features" if rep_grad else "params"
        row = Row(f"LibMTL {cls_name} [{kind}]", "libmtl", kind, step=lambda: None)
        if module is None:
            row.error = "n/a (LibMTL not importable)"
            rows.append(row)
            continue
        weighting = _libmtl_weighting(module, cls_name, p, rep_grad)

        def step(weighting: nn.Module = weighting, rep_grad: bool = rep_grad, kw=kwargs) -> None:
            p.zero_grad()
            features, losses = p.forward()
            if rep_grad:
                # LibMTL's rep_grad: each head reads its own detached copy of the
                # representation, whose .grad is that task's gradient.
                copies = [features.detach().clone().requires_grad_() for _ in p.heads]
                losses = [p.loss(h(c), y) for h, c, y in zip(p.heads, copies, p.ys)]
                weighting.rep = features
                weighting.rep_tasks = dict(zip(weighting.task_name, copies))
            weighting.backward(torch.stack(losses), **kw)

        row.step = step
        rows.append(row)
    return rows


def torchjd_rows(p: Problem) -> list[Row]:
    rows = []
    try:
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
    except Exception:
        return [
            Row(
                "torchjd mtl_backward + UPGrad",
                "torchjd",
                "params",
                lambda: None,
                error="n/a (torchjd not importable)",
            )
        ]
    shared = p.shared()
    for chunk in (None, 1):
        aggregator = UPGrad()

        def step(chunk: int | None = chunk, aggregator: Any = aggregator) -> None:
            p.zero_grad()
            features, losses = p.forward()
            mtl_backward(losses, features=features, parallel_chunk_size=chunk)
            jac_to_grad(shared, aggregator)

        label = "torchjd mtl_backward + UPGrad" + (
            " [parallel_chunk_size=1]" if chunk == 1 else " [default: vmap]"
        )
        rows.append(Row(label, "torchjd", "params", step))
    return rows


# -- timing ----------------------------------------------------------------------------


def run_round_robin(
    rows: list[Row],
    *,
    warmup: int,
    repeats: int,
    clock: Callable[[], float],
    budget_s: float | None = None,
    log: Callable[[str], None],
) -> None:
    """Warm up every row, then time ``repeats`` rounds, each running every row once."""
    live = [r for r in rows if r.error is None]
    for _ in range(warmup):
        for row in live:
            _call(row, clock)
        live = [r for r in live if r.error is None]
        for row in live:
            row.times.clear()
    start = time.perf_counter()
    for rep in range(repeats):
        live = [r for r in live if r.error is None]
        if not live:
            return
        shift = rep % len(live)
        for row in live[shift:] + live[:shift]:
            _call(row, clock)
        if budget_s is not None and time.perf_counter() - start > budget_s and rep >= 1:
            log(f"    time budget reached after {rep + 1} repeats")
            return


def _call(row: Row, clock: Callable[[], float]) -> None:
    try:
        t0 = clock()
        row.step()
        row.times.append(clock() - t0)
    except Exception as exc:
        row.error = f"error: {type(exc).__name__}: {exc}"[:100]


# -- the Jacobian engine's strategies --------------------------------------------------


def _jacobian_rows(p: Problem, mode: str) -> list[Row]:
    """Forward + Jacobian (shared params or features) by each path, the same problem."""
    shared = p.shared()
    k = p.num_tasks
    chunk = min(k, 16)

    def engine_row(strategy: str, max_chunk: int | None = None) -> Callable[[], None]:
        def step() -> None:
            p.zero_grad()
            features, losses = p.forward()
            inputs = shared if mode == "params" else [features]
            jacobian(
                torch.stack(losses),
                inputs,
                strategy=strategy,  # type: ignore[arg-type]
                max_chunk=max_chunk,
                retain_graph=False,
            )

        return step

    def select_loop() -> None:
        # The old loop: differentiate losses[k], which sends zero cotangents through every
        # other task's head (K^2 head backwards).
        p.zero_grad()
        features, losses = p.forward()
        stacked = torch.stack(losses)
        inputs = shared if mode == "params" else [features]
        for i in range(k):
            torch.autograd.grad(stacked[i], inputs, retain_graph=i < k - 1, allow_unused=True)

    rows = [
        Row("loop from losses[k] (K^2 heads)", "engine", mode, select_loop),
        Row("loop (per-task loss edges)", "engine", mode, engine_row("loop")),
        Row(
            "batched (is_grads_batched)",
            "engine",
            mode,
            engine_row("batched", chunk),
        ),
    ]
    if mode == "params":
        rows.append(Row("torch.func vmap(vjp)", "engine", mode, _func_step(p, chunk)))
    return rows


def _func_step(p: Problem, chunk: int) -> Callable[[], None]:
    """torch.func: functional forward, ``vjp``, ``vmap`` over the K one-hot cotangents."""
    from torch.func import functional_call, vjp, vmap

    names = [n for n, _ in p.encoder.named_parameters()]
    k = p.num_tasks

    def losses_of(*params: Tensor) -> Tensor:
        features = functional_call(p.encoder, dict(zip(names, params)), (p.x,))
        return torch.stack([p.loss(h(features), y) for h, y in zip(p.heads, p.ys)])

    def step() -> None:
        p.zero_grad()
        _, vjp_fn = vjp(losses_of, *p.shared())
        eye = torch.eye(k)
        vmap(vjp_fn, chunk_size=chunk)(eye)

    return step


def auto_choice(p: Problem, mode: str) -> str:
    """Run the ``"auto"`` engine until it has chosen; return its choice and reason."""
    engine = JacobianEngine("auto")
    shared = p.shared()
    for _ in range(8):
        p.zero_grad()
        features, losses = p.forward()
        engine(torch.stack(losses), shared if mode == "params" else [features])
        if engine.choice:
            break
    return next(iter(engine.choice.values()), "undecided")


# -- the method's own work -------------------------------------------------------------


def own_work(
    p: Problem, repeats: int, log: Callable[[str], None], names: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """Time each gradient method given a precomputed Jacobian / Gramian (params mode)."""
    shared = p.shared()
    _, losses = p.forward()
    stacked = torch.stack(losses)
    detached = stacked.detach()
    jac = jacobian(stacked, shared, strategy="loop", retain_graph=False)
    g = gramian(jac)
    sizes = tuple(t.numel() for t in shared)
    out = []

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out.append(
        ("G = J Jᵀ (shared by Gramian methods)", "—", f"{timed(lambda: gramian(jac)) * 1e3:.2f}")
    )
    for name in polytask.methods.available() if names is None else names:
        cls = polytask.methods.get(name)
        if not issubclass(cls, GradientMethod) or cls.needs or p.num_tasks < cls.min_tasks:
            continue
        try:
            m = polytask.methods.create(name, p.num_tasks, **_method_kwargs(cls, None, p))
            if issubclass(cls, GramianMethod):
                what = "weights from G"
                t = timed(lambda m=m: m._weights(g, losses=detached, param_sizes=sizes))
            else:
                what = "aggregate J"
                t = timed(lambda m=m: m._aggregate(jac, losses=detached, param_sizes=sizes))
            out.append((name, what, f"{t * 1e3:.2f}"))
        except Exception as exc:
            out.append((name, "error", f"{type(exc).__name__}: {exc}"[:120]))
    try:
        from torchjd.aggregation import UPGradWeighting

        w = UPGradWeighting()
        out.append(
            ("torchjd UPGradWeighting", "weights from G", f"{timed(lambda: w(g)) * 1e3:.2f}")
        )
    except Exception as exc:
        log(f"    torchjd own work skipped: {exc}")
    try:
        from torchjd.aggregation import NashMTL

        nash = NashMTL(n_tasks=p.num_tasks)
        out.append(("torchjd NashMTL", "aggregate J", f"{timed(lambda: nash(jac)) * 1e3:.2f}"))
    except Exception as exc:
        out.append(("torchjd NashMTL", "n/a", f"{type(exc).__name__}: {exc}"[:120]))
    return out


# -- the report ------------------------------------------------------------------------

TARGETS = {
    "loss": 1.1,
    "features": 1.3,
}


def _ratio(row: Row, ew: float | None) -> str:
    if row.error is not None:
        return row.error.replace("|", "/")
    m = row.median()
    if m is None or ew is None:
        return "—"
    return f"{m / ew:.2f}x"


def _environment(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()} "
        f"(`torch.set_num_threads`), CPU: {cpu}, {os.cpu_count()} logical cores",
        f"- load average at start: {_loadavg()}{_busy_warning()}",
        f"- clock: {args.clock}; {args.warmup} warm-up call(s), median of {args.repeats} "
        "round-robin repeat(s)",
        f"- quick mode: {args.quick}",
    ]


def _busy_warning() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (
            f" (**busy machine**: other processes use about {load:.1f} of {cores} cores, "
            "so these ratios are noisy; re-run on an idle machine)"
        )
    return ""


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_report(
    path: Path,
    args: argparse.Namespace,
    env: list[str],
    results: dict[str, dict[int, list[Row]]],
    engine: dict[str, dict[tuple[int, str], tuple[list[Row], str]]],
    work: list[tuple[str, str, str]],
    work_model: str,
    work_k: int,
) -> None:
    lines = [
        "# Speed",
        "",
        "<!-- Written by benchmarks/speed.py; do not edit by hand. -->",
        "",
        "Step time (zero the grads, forward, balance, backward; not the optimizer's update) "
        "of every method divided by equal weighting's (EW: sum of the losses, one backward) "
        "on the same model and batch, measured side by side in one run. Lower is better.",
        "",
        *env,
        "",
        "Rows:",
        "",
        "- **EW**: `torch.stack(losses).sum().backward()`; its cell shows the time in ms.",
        "- **loop of K backward passes**: `loss_k.backward(retain_graph=True)` and a copy of "
        "the shared gradient, K times: the baseline a params-mode method should not be "
        "slower than.",
        "- **polytask methods**: every registered method; gradient methods in `params` mode "
        "(Jacobian w.r.t. the shared parameters) and `features` mode (Jacobian w.r.t. the "
        "shared representation, one backward through the encoder).",
        "- **torchjd** (`mtl_backward` + `jac_to_grad(UPGrad())`) and **LibMTL** weightings "
        "(`rep_grad=False` is params mode, `rep_grad=True` features mode) on the same model.",
        "",
        "Targets: loss-only methods at most "
        f"{TARGETS['loss']}x EW; features mode at most {TARGETS['features']}x EW; params "
        "mode not slower than the loop of K backward passes measured in the same run.",
        "",
    ]
    for model, by_k in results.items():
        ks = sorted(by_k)
        lines += [
            f"## {model.upper()}",
            "",
            args.describe[model] + ".",
            "",
        ]
        ew = {k: next(r for r in by_k[k] if r.kind == "ew").median() for k in ks}
        lines.append("| row | " + " | ".join(f"K={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        labels: list[str] = []
        for k in ks:
            for r in by_k[k]:
                if r.label not in labels:
                    labels.append(r.label)
        for label in labels:
            cells = []
            for k in ks:
                row = next((r for r in by_k[k] if r.label == label), None)
                if row is None:
                    cells.append("—")
                elif row.kind == "ew" and ew[k] is not None:
                    cells.append(f"1.00x ({ew[k] * 1e3:.1f} ms)")
                else:
                    cells.append(_ratio(row, ew[k]))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", *_target_lines(by_k, ew), ""]
    if engine:
        lines += [
            "## Jacobian engine",
            "",
            "Forward plus the K x P Jacobian (params: w.r.t. the shared parameters; features: "
            "w.r.t. the representation) by each path, in ms; the batched paths take at most 16 "
            "tasks per reverse pass; `auto` is the strategy that "
            '`JacobianEngine("auto")` chose after its trial on this problem.',
            "",
        ]
        for model, by in engine.items():
            lines += [f"### {model.upper()}", ""]
            labels = []
            for rows, _ in by.values():
                for r in rows:
                    if r.label not in labels:
                        labels.append(r.label)
            lines.append("| K, mode | " + " | ".join(labels) + " | auto's choice |")
            lines.append("|---|" + "---|" * (len(labels) + 1))
            for (k, mode), (rows, choice) in sorted(by.items()):
                cells = []
                times = [m for r in rows if (m := r.median()) is not None]
                best = min(times) if times else None
                for label in labels:
                    row = next((r for r in rows if r.label == label), None)
                    m = None if row is None else row.median()
                    if row is not None and row.error:
                        cells.append(row.error.replace("|", "/"))
                    elif m is None:
                        cells.append("—")
                    else:
                        # The fastest path of the row in bold.
                        cells.append(f"**{m * 1e3:.1f}**" if m == best else f"{m * 1e3:.1f}")
                lines.append(f"| K={k}, {mode} | " + " | ".join(cells) + f" | {choice} |")
            lines.append("")
    lines += flop_notes(args)
    lines += rotograd_notes(args)
    if work:
        lines += [
            f"## Method's own work (K = {work_k}, {work_model.upper()} params-mode Jacobian)",
            "",
            "Time in ms of the method alone given a precomputed Jacobian J (K x P) or "
            "Gramian G = J Jᵀ, beyond computing them: `_weights(G)` for Gramian methods, "
            "`_aggregate(J)` for methods that need J itself (which includes their "
            "O(K² P) work on J). Target: under 1 ms at K = 10.",
            "",
            "| method | what is timed | ms |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in work]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def flop_notes(args: argparse.Namespace) -> list[str]:
    """Why params mode cannot be much cheaper than the loop here: multiply-add counts."""
    if "mlp" not in args.describe:
        return []
    p = make_problem("mlp", 1, quick=args.quick)
    b = p.x.shape[0]
    layers = [m for m in p.encoder if isinstance(m, nn.Linear)]
    fwd = sum(b * m.in_features * m.out_features for m in layers)
    # Per task: every weight gradient, and the input gradient of every layer but the first.
    bwd = fwd + sum(b * m.in_features * m.out_features for m in layers[1:])
    k = 10
    sample = sum(b * b * m.in_features + (k * b) ** 2 * m.out_features for m in layers)
    weight = k * bwd + k * k * sum(m.in_features * m.out_features for m in layers)
    floor = (fwd + k * bwd) / (fwd + bwd)
    return [
        "## Why params mode stays near the loop on these models",
        "",
        f"Multiply-add counts of the MLP encoder at batch B = {b}, K = {k} (from the layer "
        "shapes, not measured):",
        "",
        "| quantity | multiply-adds |",
        "|---|---|",
        f"| forward | {fwd / 1e6:.1f} M |",
        f"| one task's backward (weight gradients + input gradients) | {bwd / 1e6:.1f} M |",
        f"| exact Jacobian by K backward passes (loop or batched), plus J Jᵀ | "
        f"{weight / 1e6:.1f} M |",
        "| Gramian from activations in sample space, Σ_layers B²·in + (K·B)²·out "
        f"(no per-task weight gradient) | {sample / 1e6:.1f} M |",
        "",
        "The Gramian of a linear layer can be formed from its inputs A [B, in] and the "
        "per-task output gradients δ_k [B, out] without per-task weight gradients, as "
        "⟨δ_iᵀA, δ_jᵀA⟩ = Σ (A Aᵀ) ⊙ (δ_i δ_jᵀ); that is cheaper only when B is well below "
        "the layer widths. Here B is larger, so forming each task's weight gradient "
        "(what the loop does) is the cheapest exact route, and a batched-cotangent backward "
        "does the same multiply-adds in larger matrix products: on CPU it measured no "
        "faster (see the engine table). The flop floor of any exact params-mode step is "
        f"about (forward + K backward) / (forward + backward) = {floor:.1f}x EW at K = {k}.",
        "",
        "Features mode escapes it: the heads read the representation through linear "
        "layers, so `JacobianEngine.gramian` forms G from the heads' output gradients and "
        "weights (`linear_heads_gramian`) without the K x (B·D) Jacobian, and a Gramian "
        "method's update is then one backward of Σ w_k L_k. "
        + (
            "`GramianMethod.backward` takes that path in features mode."
            if GramianMethod.backward is not GradientMethod.backward
            else "`GramianMethod.backward` does not take that path yet (it forms J, then "
            "G = J Jᵀ and w @ J), so features mode still pays for J at large K."
        ),
        "",
    ]


def rotograd_notes(args: argparse.Namespace) -> list[str]:
    """Why RotoGrad's rows stand apart: its rotations cost the same whatever the batch."""
    if not args.describe:
        return []
    d = make_problem(next(iter(args.describe)), 1, quick=args.quick).heads[0].in_features
    return [
        "## Why RotoGrad costs more",
        "",
        f"RotoGrad's heads read rotated copies R_k z of the {d}-dimensional representation. "
        "Each step makes the K rotations from their generators by a matrix exponential "
        f"(K {d} x {d} exponentials for the forward and again for the rotation objective) and "
        "differentiates the objective through them (torch does that by the exponential of a "
        f"{2 * d} x {2 * d} block matrix per task): O(K d³) work that does not shrink with "
        "the batch, so its ratio to EW grows with K and is largest on the cheap MLP step. "
        "The exponential map is the paper's parametrisation (the official code uses "
        "geotorch's `expm`). `rotation_size=m` rotates only the first m coordinates, as a "
        "rotation smaller than the representation does in the official code, and the cost "
        "falls as m³: the `rotation_size` row.",
        "",
    ]


def _target_lines(by_k: dict[int, list[Row]], ew: dict[int, float | None]) -> list[str]:
    misses = []
    for k, rows in sorted(by_k.items()):
        loop = next((r.median() for r in rows if r.kind == "loop"), None)
        e = ew[k]
        if e is None:
            continue
        for r in rows:
            m = r.median()
            if r.group != "polytask" or m is None:
                continue
            ratio = m / e
            if r.kind in TARGETS and ratio > TARGETS[r.kind]:
                misses.append(f"{r.label} at K={k} ({ratio:.2f}x > {TARGETS[r.kind]}x)")
            if r.kind == "params" and loop is not None and m > loop:
                misses.append(f"{r.label} at K={k} ({ratio:.2f}x > loop {loop / e:.2f}x)")
    if not misses:
        return ["All polytask rows meet their targets in this run."]
    return ["Polytask rows missing their target in this run: " + "; ".join(misses) + "."]


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for CI (< 60 s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file to write (default docs/speed.md; quick: docs/speed-quick.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 2, or 1 in --quick mode, where a busy CI "
        "machine makes OpenMP's spinning threads cost far more than they bring)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--tasks", default=None, help="comma-separated K values")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (steadier on a busy machine)",
    )
    parser.add_argument("--no-external", action="store_true", help="skip torchjd and LibMTL rows")
    parser.add_argument(
        "--methods", default=None, help="comma-separated method names (default: all registered)"
    )
    parser.add_argument("--no-engine", action="store_true", help="skip the engine section")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per (model, K) timing phase before repeats stop early",
    )
    args = parser.parse_args(argv)

    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.threads is None:
        args.threads = 1 if args.quick else min(2, os.cpu_count() or 1)
    args.warmup = args.warmup if args.warmup is not None else 1
    names = None if args.methods is None else [n.strip() for n in args.methods.split(",")]
    ks = [int(k) for k in (args.tasks or ("2,4" if args.quick else "2,10,40")).split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = args.out or ROOT / "docs" / ("speed-quick.md" if args.quick else "speed.md")
    args.describe = {m: describe(make_problem(m, 1, quick=args.quick)) for m in models}
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    env = _environment(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, dict[int, list[Row]]] = {}
    engine: dict[str, dict[tuple[int, str], tuple[list[Row], str]]] = {}
    t_start = time.perf_counter()
    for model in models:
        results[model] = {}
        engine[model] = {}
        for k in ks:
            p = make_problem(model, k, quick=args.quick)
            strategies: dict[str, str] = {}
            for mode in ("params", "features"):
                choice = auto_choice(p, mode)
                strategies[mode] = choice.split(" ", 1)[0]
                if not args.no_engine:
                    rows = _jacobian_rows(p, mode)
                    log(f"{model} K={k} engine {mode}")
                    run_round_robin(
                        rows,
                        warmup=1,
                        repeats=max(1, min(args.repeats, 3)),
                        clock=clock,
                        budget_s=args.budget,
                        log=log,
                    )
                    engine[model][(k, mode)] = (rows, choice)
            rows = [
                Row("EW (sum of losses, one backward)", "reference", "ew", _ew_step(p)),
                Row("loop of K backward passes", "reference", "loop", _loop_step(p)),
                *polytask_rows(p, strategies, names),
            ]
            if not args.no_external:
                rows += torchjd_rows(p) + libmtl_rows(p)
            log(
                f"{model} K={k}: {sum(r.error is None for r in rows)} rows "
                f"(strategies {strategies})"
            )
            with contextlib.redirect_stdout(io.StringIO()):  # LibMTL prints
                run_round_robin(
                    rows,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    clock=clock,
                    budget_s=args.budget,
                    log=log,
                )
            results[model][k] = rows
    work_model, work_k = ("mlp" if "mlp" in models else models[0]), 10
    work = own_work(
        make_problem(work_model, work_k, quick=args.quick),
        repeats=5 if args.quick else 20,
        log=log,
        names=names,
    )
    write_report(
        out, args, env, results, engine if not args.no_engine else {}, work, work_model, work_k
    )
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
