"""Figures of a report table: training curves, task weights, gains over STL, the Pareto front.

Each function draws PNGs for one :class:`~polytask.results.report.Table` with matplotlib's
Agg canvas on a bare :class:`~matplotlib.figure.Figure` (no pyplot: nothing global changes,
no window opens, safe inside a notebook or a worker process). A method keeps its colour in
every figure of a table and an architecture its marker; legends sit outside the axes so
they never hide data; every title names the benchmark (and the recipe when the store holds
several for it). Curves and weights get one figure per architecture, since each has its
own single-task baselines and a figure of every line of every architecture is unreadable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from polytask.results.store import ResultsStore, RunRecord

if TYPE_CHECKING:
    from polytask.results.report import Row, Table

__all__ = ["Plot", "pareto_front", "render_plots"]

_DPI = 120
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_History = Mapping[int, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Plot:
    """A written figure: its key (the file stem), path and a one-line title."""

    key: str
    path: Path
    title: str


def render_plots(table: Table, store: ResultsStore, out_dir: str | Path) -> list[Plot]:
    """Draw the figures of ``table`` into ``out_dir`` and return them, in report order.

    Figures without data are left out: weights when no method records them, the gains over
    STL without baselines, the Pareto front unless the benchmark has exactly two tasks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = {run.id: store.epochs(run.id) for row in table.rows for run in row.runs}
    style = _Style(table)
    plots: list[Plot] = []
    for arch in style.archs:
        plots += _curves(table, arch, history, style, out)
    for arch in style.archs:
        plots += _weights(table, arch, history, style, out)
    plots += _improvements(table, style, out)
    plots += _pareto(table, style, out)
    return plots


# -- shared helpers ----------------------------------------------------------------------------


class _Style:
    """A colour per method label (tab10, tab20 beyond 10), a line style per block of 20 labels
    (so that 34 methods stay distinguishable) and a marker per architecture."""

    def __init__(self, table: Table) -> None:
        self.archs = list(dict.fromkeys(row.arch for row in table.rows))
        labels = list(dict.fromkeys(row.label for row in table.method_rows))
        cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
        self.color = {label: to_hex(cmap(i % cmap.N)) for i, label in enumerate(labels)}
        self.dash = {label: ("-", "--", ":")[(i // cmap.N) % 3] for i, label in enumerate(labels)}
        #: Hollow markers for the labels whose colour an earlier label already has.
        self.hollow = {label: i >= cmap.N for i, label in enumerate(labels)}
        self.marker = {arch: _MARKERS[i % len(_MARKERS)] for i, arch in enumerate(self.archs)}
        self.several_archs = len(self.archs) > 1

    def name(self, row: Row) -> str:
        return f"{row.arch} / {row.label}" if self.several_archs else row.label


def _by_epoch(
    runs: Sequence[RunRecord],
    history: _History,
    split: str,
    value: Callable[[Mapping[str, Any]], Any],
) -> dict[int, list[Any]]:
    """epoch -> the values ``value(entry)`` of the runs' epoch rows of ``split`` (``None``
    left out), in epoch order."""
    out: dict[int, list[Any]] = {}
    for run in runs:
        for entry in history[run.id]:
            if entry["split"] == split:
                v = value(entry)
                if v is not None:
                    out.setdefault(int(entry["epoch"]), []).append(v)
    return dict(sorted(out.items()))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    cols = min(ncols, n)
    return math.ceil(n / cols), cols


def _direction_words(higher: bool) -> str:
    return "↑ higher is better" if higher else "↓ lower is better"


def _panel_legend(fig: Figure, axes: Sequence[Any]) -> None:
    """One legend for all panels, centred on the right edge: clear of the panels and of the
    figure's title."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=9)


def _save(fig: Figure, out: Path, stem: str, title: str) -> Plot:
    FigureCanvasAgg(fig)
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=_DPI)
    return Plot(stem, path, title)


def _integer_epochs(ax: Any) -> None:
    ax.xaxis.get_major_locator().set_params(integer=True)


# -- the figures -------------------------------------------------------------------------------


def _curves(table: Table, arch: str, history: _History, style: _Style, out: Path) -> list[Plot]:
    """Validation metric per epoch, one line per method (mean over seeds), STL dashed."""
    metrics = list(table.directions)
    rows = [row for row in table.method_rows if row.arch == arch]
    stl_runs = table.stl_runs.get(arch, [])
    nrows, ncols = _grid(len(metrics))
    fig = Figure(figsize=(4.3 * ncols + 2.4, 3.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    drawn = False
    for ax, metric in zip(axes, metrics):
        task = metric.split("/", 1)[0]
        lines = [
            (row.label, row.runs, style.color[row.label], style.dash[row.label]) for row in rows
        ]
        own = [r for r in stl_runs if r.hparams.get("task") == task]
        lines.append(("STL (single-task)", own, "black", "--"))
        for label, runs, color, linestyle in lines:
            series = _by_epoch(runs, history, "val", lambda e, m=metric: e["metrics"].get(m))
            if series:
                drawn = True
                ax.plot(
                    list(series),
                    [_mean(v) for v in series.values()],
                    color=color,
                    linestyle=linestyle,
                    marker=style.marker[arch],
                    markersize=3.5,
                    label=label,
                )
        ax.set_title(f"{metric} ({_direction_words(table.directions[metric])})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    if not drawn:
        return []
    _panel_legend(fig, axes[: len(metrics)])
    title = f"{table.title}, {arch}: validation metrics per epoch (mean over seeds)"
    fig.suptitle(title)
    return [_save(fig, out, f"{table.slug}_{arch}_curves", title)]


def _weights(table: Table, arch: str, history: _History, style: _Style, out: Path) -> list[Plot]:
    """Mean task weight per epoch (``train`` rows), one panel per method that records them."""
    tasks = table.tasks
    panels = []
    for row in table.method_rows:
        if row.arch == arch:
            series = _by_epoch(
                row.runs, history, "train", lambda e: (e["extra"] or {}).get("weights")
            )
            if series:
                panels.append((row, series))
    if not panels:
        return []
    nrows, ncols = _grid(len(panels))
    fig = Figure(figsize=(4.0 * ncols + 1.6, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    for ax, (row, series) in zip(axes, panels):
        width = len(next(iter(series.values()))[0])
        names = tasks if width == len(tasks) else [f"task {k}" for k in range(width)]
        for k, name in enumerate(names):
            ax.plot(
                list(series),
                [_mean([w[k] for w in ws]) for ws in series.values()],
                color=cmap(k % cmap.N),
                marker="o",
                markersize=3.5,
                label=name,
            )
        ax.set_title(row.label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean task weight")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _panel_legend(fig, axes[: len(panels)])
    title = f"{table.title}, {arch}: task weights per epoch (mean over steps and seeds)"
    fig.suptitle(title)
    return [_save(fig, out, f"{table.slug}_{arch}_weights", title)]


def _improvements(table: Table, style: _Style, out: Path) -> list[Plot]:
    """Each metric's relative change against the baselines in %, signed so that positive
    is better: one panel per metric, one horizontal bar per method (± std over seeds)."""
    rows = [row for row in table.method_rows if row.improvement]
    if not rows:
        return []
    metrics = list(table.directions)
    nrows, ncols = _grid(len(metrics), 4)
    height = 0.26 * len(rows) + 1.3
    fig = Figure(figsize=(3.1 * ncols + 2.4, height * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    ys = list(range(len(rows)))
    for ax, metric in zip(axes, metrics):
        stats = [row.improvement[metric] for row in rows]
        ax.barh(
            ys,
            [s.mean for s in stats],
            xerr=[s.std or 0.0 for s in stats] if any(s.std for s in stats) else None,
            color=[style.color[row.label] for row in rows],
            capsize=2.5,
            height=0.7,
            error_kw={"elinewidth": 0.8, "ecolor": "0.25"},
        )
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{metric} {'↑' if table.directions[metric] else '↓'}", fontsize=10)
        ax.set_xlabel("vs STL (%), + is better", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [style.name(row) for row in rows], fontsize=9)
    axes[0].invert_yaxis()  # the table's order, top to bottom
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    title = f"{table.title}: test metrics against single-task baselines (mean ± std over seeds)"
    fig.suptitle(title, fontsize=11)
    return [_save(fig, out, f"{table.slug}_vs_stl", title)]


def _dominates(a: Sequence[float], b: Sequence[float], higher: Sequence[bool]) -> bool:
    better = [(x > y) if h else (x < y) for x, y, h in zip(a, b, higher)]
    worse = [(x < y) if h else (x > y) for x, y, h in zip(a, b, higher)]
    return any(better) and not any(worse)


def pareto_front(points: Sequence[Sequence[float]], higher: Sequence[bool]) -> list[bool]:
    """Whether each point is non-dominated: no other point is at least as good on every
    objective and better on one (``higher[i]``: objective i is better when larger)."""
    return [not any(_dominates(q, p, higher) for q in points) for p in points]


def _pareto(table: Table, style: _Style, out: Path) -> list[Plot]:
    """Two-task benchmarks: one point per run at the first test metric of each task, the
    non-dominated runs circled, the single-task baselines starred."""
    tasks = table.tasks
    if len(tasks) != 2 or not table.method_rows:
        return []
    metrics = [next(m for m in table.directions if m.split("/", 1)[0] == t) for t in tasks]
    higher = [table.directions[m] for m in metrics]
    # A two-column legend beside the axes when there are many methods.
    fig = Figure(figsize=(11.5 if len(style.color) > 20 else 8.4, 5.2), layout="constrained")
    ax = fig.subplots()
    points: list[tuple[float, float]] = []
    for row in table.method_rows:
        xy = [(run.test[metrics[0]], run.test[metrics[1]]) for run in row.runs]
        xy = [p for p in xy if math.isfinite(p[0]) and math.isfinite(p[1])]  # diverged runs
        points += xy
        color = style.color[row.label]
        ax.scatter(
            [p[0] for p in xy],
            [p[1] for p in xy],
            facecolors="none" if style.hollow[row.label] else color,
            edgecolors=color,
            marker=style.marker[row.arch],
            s=36,
            zorder=3,
        )
    if not points:
        return []
    front = sorted(p for p, keep in zip(points, pareto_front(points, higher)) if keep)
    ax.plot(*zip(*front), color="0.4", linestyle=":", linewidth=1.0, zorder=2)
    ax.scatter(*zip(*front), s=150, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
    for arch, base in table.baselines.items():
        x, y = base[metrics[0]], base[metrics[1]]
        ax.scatter(
            [x], [y], marker="*", s=260, color="gold", edgecolors="black", linewidths=0.8, zorder=5
        )
        if style.several_archs:
            ax.annotate(arch, (x, y), xytext=(8, 8), textcoords="offset points", fontsize=8)
        ax.axvline(x, color="0.6", linestyle="--", linewidth=0.7, zorder=1)
        ax.axhline(y, color="0.6", linestyle="--", linewidth=0.7, zorder=1)
    for setter, metric, h in zip((ax.set_xlabel, ax.set_ylabel), metrics, higher):
        setter(f"test {metric} ({_direction_words(h)})")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    handles = [
        Line2D(
            [], [], color=color, marker="o", linestyle="", label=label,
            markerfacecolor="none" if style.hollow[label] else color,
        )
        for label, color in style.color.items()
    ]  # fmt: skip
    if style.several_archs:
        handles += [
            Line2D([], [], color="0.4", marker=marker, linestyle="", label=arch)
            for arch, marker in style.marker.items()
        ]
    handles.append(
        Line2D(
            [], [], marker="o", markersize=12, markerfacecolor="none", markeredgecolor="black",
            linestyle=":", color="0.4", label="non-dominated (Pareto front)",
        )
    )  # fmt: skip
    if table.baselines:
        handles.append(
            Line2D(
                [], [], marker="*", markersize=14, color="gold", markeredgecolor="black",
                linestyle="", label="STL (single-task, mean over seeds)",
            )
        )  # fmt: skip
    many = len(handles) > 24
    fig.legend(handles=handles, loc="outside right upper", fontsize=8 if many else 9,
               ncols=2 if many else 1)  # fmt: skip
    title = f"{table.title}: test metrics per run, the non-dominated runs circled"
    ax.set_title(title, fontsize=10)
    return [_save(fig, out, f"{table.slug}_pareto", title)]
