"""Reports of a results store: tables of test metrics and Δm, as Markdown, LaTeX and HTML.

For every benchmark with finished runs, and every training recipe its runs used (runs of
different recipes are never averaged together), one table: a row per (architecture, method,
hyper-parameters) with each task metric of the test split at the epoch selected on validation
(mean ± sample standard deviation over seeds), Δm% against the single-task baselines of the
same architecture and recipe, the number of seeds and the rank by mean Δm; and a row per
architecture with the single-task baselines themselves. :func:`write_report` writes the
three documents and the figures of :mod:`polytask.results.plots` into one folder.

Δm follows :func:`polytask.results.delta_m.delta_m`: lower is better (Navon et al., ICML 2022;
Liu et al., NeurIPS 2023). Each seed's Δm is taken against the single-task baselines averaged
over *their* seeds (the scores :func:`polytask.train.runner.baseline_scores` gives), then the
seeds' Δm are averaged; that is what Nash-MTL's and FAMO's tables report.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from polytask.errors import PolytaskError
from polytask.results.delta_m import delta_m
from polytask.results.store import ResultsStore, RunRecord

if TYPE_CHECKING:
    from polytask.results.plots import Plot

__all__ = [
    "STL_LABEL",
    "ReportError",
    "Row",
    "Stat",
    "Table",
    "build_tables",
    "latex_escape",
    "to_html",
    "to_latex",
    "to_markdown",
    "write_report",
]

#: The label of the single-task baselines' row.
STL_LABEL = "STL (single-task)"


class ReportError(PolytaskError, ValueError):
    """The store's runs cannot be tabulated as asked (the message says which run and why)."""


@dataclass(frozen=True)
class Stat:
    """Values of one quantity over seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1 in the denominator); ``None`` for one seed."""
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass
class Row:
    """One row of a table: a method on an architecture (or that architecture's baselines).

    ``improvement`` is each metric's relative change against the baseline in percent,
    signed so that positive is better (what the bar plot shows); empty without baselines.
    ``best`` names the columns (metrics, ``"delta_m"``) where this row has the best mean
    among the methods of its architecture. ``is_stl``: the row of the baselines.
    """

    arch: str
    method: str
    label: str
    runs: list[RunRecord]
    metrics: dict[str, Stat]
    delta_m: Stat | None = None
    improvement: dict[str, Stat] = field(default_factory=dict)
    rank: int | None = None
    best: set[str] = field(default_factory=set)
    is_stl: bool = False

    @property
    def seeds(self) -> str:
        counts = sorted({s.n for s in self.metrics.values()})
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


@dataclass
class Table:
    """The runs of one benchmark under one recipe.

    Attributes:
        benchmark: the benchmark's name.
        recipe: the recipe (as stored with the runs).
        recipe_label: the fields that set this recipe apart from the benchmark's other
            recipes in the store (``None`` when all its runs share one recipe).
        slug: a file-name stem unique to (benchmark, recipe).
        directions: ``"task/metric"`` -> higher is better, in column order.
        rows: per architecture, its baselines' row (if any), then its methods by rank.
        baselines: architecture -> metric -> single-task score averaged over seeds (an
            architecture without a baseline for every task is absent).
        stl_runs: architecture -> the finished single-task runs of this recipe.
        notes: sentences printed under the table (`code` in backticks).
    """

    benchmark: str
    recipe: dict[str, Any]
    recipe_label: str | None
    slug: str
    directions: dict[str, bool]
    rows: list[Row]
    baselines: dict[str, dict[str, float]]
    stl_runs: dict[str, list[RunRecord]]
    notes: list[str]

    @property
    def title(self) -> str:
        return self.benchmark + (f" ({self.recipe_label})" if self.recipe_label else "")

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(_task_of(m) for m in self.directions))

    @property
    def method_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.is_stl]


# -- building the tables ----------------------------------------------------------------------


def _task_of(metric: str) -> str:
    return metric.split("/", 1)[0]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _flatten(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sorted(recipe.items()):
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _format_fields(fields: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"


def _method_label(method: str, hparams: Mapping[str, Any]) -> str:
    if not hparams:
        return method
    return f"{method} ({', '.join(f'{k}={v}' for k, v in sorted(hparams.items()))})"


def _directions_for(
    benchmark: str, directions: Mapping[str, Mapping[str, bool]] | None
) -> dict[str, bool]:
    if directions is not None and benchmark in directions:
        out = dict(directions[benchmark])
    else:
        from polytask.data import benchmark as benchmarks

        if benchmark not in benchmarks.available():
            raise ReportError(
                f"benchmark {benchmark!r} of the store is not registered, so the directions of "
                "its metrics are unknown; pass directions={"
                f"{benchmark!r}: {{'task/metric': higher_is_better, ...}}}}"
            )
        out = benchmarks.get(benchmark).tasks().directions
    bad = {k: v for k, v in out.items() if not isinstance(v, bool) or "/" not in k}
    if not out or bad:
        raise ReportError(
            f"directions of benchmark {benchmark!r} must map 'task/metric' names to True "
            f"(higher is better) or False; got {bad or out}"
        )
    return out


def _test_scores(run: RunRecord, metrics: Sequence[str]) -> dict[str, float]:
    """The run's test metrics, exactly ``metrics`` (a mismatch is an error naming the run)."""
    test = run.test or {}
    if set(test) != set(metrics):
        raise ReportError(
            f"run #{run.id} ({run.benchmark}, {run.arch}, {run.method}, seed {run.seed}) has "
            f"test metrics {sorted(test)}, but the report expects {sorted(metrics)}; a run "
            "without a test split cannot be tabulated, and a benchmark whose metrics changed "
            "needs directions= for the metrics its runs recorded"
        )
    return {m: float(test[m]) for m in metrics}


def _competition_ranks(values: Mapping[int, float]) -> dict[int, int]:
    """1 for the lowest value; ties share the better rank (1, 2, 2, 4)."""
    return {i: 1 + sum(w < v for w in values.values()) for i, v in values.items()}


def _finite(values: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())


def _run_ids(runs: Sequence[RunRecord]) -> str:
    return ", ".join(f"#{r.id}" for r in runs)


def _stl_row(
    benchmark: str,
    arch: str,
    stl_runs: Sequence[RunRecord],
    directions: Mapping[str, bool],
    stl: str,
) -> tuple[Row | None, dict[str, float] | None, list[str], list[str]]:
    """The baselines' row, the baselines (``None`` unless every task has a finished
    single-task run with finite metrics), the tasks without a run, and notes."""
    tasks = list(dict.fromkeys(_task_of(m) for m in directions))
    values: dict[str, list[float]] = {}
    covered, diverged = set(), []
    for run in stl_runs:
        task = run.hparams.get("task")
        if task not in tasks:
            raise ReportError(
                f"single-task run #{run.id} of {benchmark!r} trains task {task!r}, which is "
                f"not one of its tasks {tasks}"
            )
        covered.add(task)
        scores = _test_scores(run, [m for m in directions if _task_of(m) == task])
        if not _finite(scores):
            diverged.append(run)
        for metric, value in scores.items():
            values.setdefault(metric, []).append(value)
    missing = [t for t in tasks if t not in covered]
    if not stl_runs:
        return None, None, missing, []
    row = Row(
        arch,
        stl,
        STL_LABEL,
        list(stl_runs),
        {m: Stat(tuple(values[m])) for m in directions if m in values},
        is_stl=True,
    )
    notes = []
    if diverged:
        notes.append(
            f"Δm: the single-task run(s) {_run_ids(diverged)} of architecture `{arch}` have "
            "non-finite test metrics, so it has no baselines; rerun them."
        )
    if missing or diverged:
        return row, None, missing, notes
    return row, {m: statistics.fmean(v) for m, v in values.items()}, missing, notes


def _method_rows(
    arch: str,
    runs: Sequence[RunRecord],
    directions: Mapping[str, bool],
    baselines: Mapping[str, float] | None,
) -> tuple[list[Row], list[str]]:
    """A row per (method, hyper-parameters) over seeds, with Δm when there are baselines;
    ranked, best columns marked, ordered by rank. Also notes."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.method, _canonical(run.hparams)), []).append(run)
    rows, notes = [], []
    for (method, _), members in sorted(groups.items()):
        members.sort(key=lambda r: r.seed)
        scores = [_test_scores(r, list(directions)) for r in members]
        row = Row(
            arch,
            method,
            _method_label(method, members[0].hparams),
            members,
            {m: Stat(tuple(s[m] for s in scores)) for m in directions},
        )
        diverged = [r for r, s in zip(members, scores) if not _finite(s)]
        if diverged:
            notes.append(
                f"`{arch}` / `{row.label}`: run(s) {_run_ids(diverged)} have non-finite test "
                "metrics (diverged); the row has no Δm and no rank."
            )
        elif baselines is not None:
            row.delta_m = Stat(tuple(delta_m(s, baselines, directions) for s in scores))
            row.improvement = {
                m: Stat(
                    tuple(
                        (1 if higher else -1) * 100.0 * (s[m] - baselines[m]) / baselines[m]
                        for s in scores
                    )
                )
                for m, higher in directions.items()
            }
        rows.append(row)

    seeds = sorted({len(r.delta_m.values) for r in rows if r.delta_m is not None})
    if len(seeds) > 1:
        notes.append(
            f"Rows average different numbers of seeds ({', '.join(map(str, seeds))}); a mean "
            "over fewer seeds is less certain (see the Seeds column) before reading the ranks."
        )
    ranked = {i: r.delta_m.mean for i, r in enumerate(rows) if r.delta_m is not None}
    for i, rank in _competition_ranks(ranked).items():
        rows[i].rank = rank
    if len(rows) > 1:  # a lone method is not "best" of anything
        if len(ranked) > 1:
            for row in rows:
                if row.rank == 1:
                    row.best.add("delta_m")
        for metric, higher in directions.items():
            means = [r.metrics[metric].mean for r in rows]
            finite = [v for v in means if math.isfinite(v)]
            if finite:
                target = max(finite) if higher else min(finite)
                for row, value in zip(rows, means):
                    if value == target:
                        row.best.add(metric)
    rows.sort(key=lambda r: (r.rank if r.rank is not None else math.inf, r.label))
    return rows, notes


def build_tables(
    store: ResultsStore,
    *,
    benchmarks: Sequence[str] | None = None,
    directions: Mapping[str, Mapping[str, bool]] | None = None,
) -> list[Table]:
    """The tables of ``store``: one per (benchmark, recipe) over its finished runs.

    Args:
        store: the results store.
        benchmarks: the benchmarks to report (each must have finished runs); by default every
            benchmark with finished runs.
        directions: benchmark -> ``"task/metric"`` -> higher is better; by default read from
            the registered benchmark (needed for benchmarks that are not registered).

    Raises:
        ReportError: a requested benchmark has no finished run, a benchmark's directions are
            unknown, or a run's test metrics do not match its benchmark's metrics.
    """
    from polytask.train.runner import STL

    every = store.runs()
    finished = [r for r in every if r.status == "finished"]
    present = sorted({r.benchmark for r in finished})
    names = present if benchmarks is None else list(dict.fromkeys(benchmarks))
    absent = [b for b in names if b not in present]
    if absent:
        raise ReportError(
            f"benchmark(s) {absent} have no finished run in the store {store.location!r}; "
            f"benchmarks with finished runs: {present}"
        )
    tables = []
    for benchmark in names:
        dirs = _directions_for(benchmark, directions)
        runs = [r for r in finished if r.benchmark == benchmark]
        # A key finished later (a failed run rerun) is not left out: count the keys that
        # never finished.
        done = {r.key for r in runs}
        unfinished = [
            r
            for r in every
            if r.benchmark == benchmark and r.status != "finished" and r.key not in done
        ]
        recipes: dict[str, dict[str, Any]] = {}
        for run in runs:
            recipes.setdefault(_canonical(run.recipe), run.recipe)
        labels = _recipe_labels(recipes)
        for key, recipe in recipes.items():
            table = _table(
                benchmark,
                recipe,
                [r for r in runs if _canonical(r.recipe) == key],
                dirs,
                stl=STL,
                label=labels[key],
                slug=benchmark + (f"_recipe-{_short_hash(key)}" if len(recipes) > 1 else ""),
            )
            if len(recipes) > 1:
                table.notes.append(
                    f"The store holds runs of {len(recipes)} recipes for `{benchmark}`; "
                    "each has its own table, and Δm compares only runs of one recipe."
                )
            counts: dict[str, int] = {}
            for r in unfinished:
                if _canonical(r.recipe) == key:
                    counts[r.status] = counts.get(r.status, 0) + 1
            if counts:
                table.notes.append(
                    "Left out, not finished: "
                    + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                    + " run(s) of this benchmark and recipe."
                )
            tables.append(table)
    return tables


def _recipe_labels(recipes: Mapping[str, Mapping[str, Any]]) -> dict[str, str | None]:
    """Per recipe, the fields in which it differs from the others (``None`` if alone)."""
    if len(recipes) < 2:
        return dict.fromkeys(recipes)
    flat = {key: _flatten(recipe) for key, recipe in recipes.items()}
    names = sorted({name for fields in flat.values() for name in fields})
    differing = [
        name for name in names if len({_canonical(f.get(name)) for f in flat.values()}) > 1
    ]
    return {
        key: "recipe: " + _format_fields({name: flat[key].get(name) for name in differing})
        for key in recipes
    }


def _table(
    benchmark: str,
    recipe: dict[str, Any],
    runs: Sequence[RunRecord],
    directions: dict[str, bool],
    *,
    stl: str,
    label: str | None,
    slug: str,
) -> Table:
    """The table of one benchmark's finished runs under one recipe."""
    rows: list[Row] = []
    baselines: dict[str, dict[str, float]] = {}
    stl_runs: dict[str, list[RunRecord]] = {}
    missing: dict[str, list[str]] = {}
    notes: list[str] = []
    for arch in sorted({r.arch for r in runs}):
        stl_runs[arch] = [r for r in runs if r.arch == arch and r.method == stl]
        stl_row, base, missing[arch], stl_notes = _stl_row(
            benchmark, arch, stl_runs[arch], directions, stl
        )
        others = [r for r in runs if r.arch == arch and r.method != stl]
        method_rows, method_notes = _method_rows(arch, others, directions, base)
        rows += ([stl_row] if stl_row else []) + method_rows
        notes += stl_notes + method_notes
        if base is not None:
            baselines[arch] = base
    if any(missing.values()):
        notes.insert(0, _missing_note(benchmark, missing))
    notes.append(_DELTA_M_NOTE)
    return Table(benchmark, recipe, label, slug, directions, rows, baselines, stl_runs, notes)


def _missing_note(benchmark: str, missing: Mapping[str, Sequence[str]]) -> str:
    """The note that replaces Δm where an architecture lacks single-task baselines."""
    detail = "; ".join(
        f"architecture `{arch}`: task(s) {', '.join(f'`{t}`' for t in tasks)}"
        for arch, tasks in missing.items()
        if tasks
    )
    return (
        f"Δm: no single-task baselines in the store (run `polytask baselines {benchmark}`), "
        f"with the same recipe as these runs. No finished single-task run for {detail}."
    )


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


_DELTA_M_NOTE = (
    "Test split at the epoch selected on validation; mean ± sample standard deviation over "
    "seeds. Δm% is each seed's relative change against the single-task baselines of the same "
    "architecture and recipe (averaged over their seeds), in percent, averaged over the task "
    "metrics with the sign of higher-is-better metrics flipped: lower is better, and negative "
    "beats the single-task networks (the convention of Nash-MTL, Navon et al., ICML 2022, and "
    "FAMO, Liu et al., NeurIPS 2023). Rank by mean Δm among the methods of one architecture; "
    "bold: the best mean of its column among them."
)


# -- cell text -------------------------------------------------------------------------------


def _decimals(value: float) -> int:
    """Decimals that show 4 significant digits of ``value`` (0 to 6)."""
    if value == 0 or not math.isfinite(value):
        return 4
    return min(6, max(0, 3 - math.floor(math.log10(abs(value)))))


def _stat_parts(stat: Stat | None, *, delta: bool = False) -> tuple[str, str | None] | None:
    """(mean, std) as text: Δm with 2 decimals and a sign, metrics with 4 significant digits."""
    if stat is None:
        return None
    mean, std = stat.mean, stat.std
    if delta:  # "+0.00", never "-0.00"
        return f"{round(mean, 2) or 0.0:+.2f}", None if std is None else f"{std:.2f}"
    d = _decimals(mean)
    return f"{mean:.{d}f}", None if std is None else f"{std:.{d}f}"


def _arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


def _header(table: Table) -> list[str]:
    return [
        "Arch",
        "Method",
        *(f"{m} {_arrow(h)}" for m, h in table.directions.items()),
        "Δm% ↓",
        "Seeds",
        "Rank",
    ]


#: A cell's content: text, or (mean, std) with std ``None`` for a single seed.
_Content = tuple[str, str | None] | str


def _cells(table: Table, row: Row) -> list[tuple[_Content, bool]]:
    """(content, bold) per column."""
    cells: list[tuple[_Content, bool]] = [
        (row.arch, False),
        (row.label, False),
    ]
    for metric in table.directions:
        parts = _stat_parts(row.metrics.get(metric))
        cells.append((parts if parts else "–", metric in row.best))
    if row.is_stl:
        parts = ("0.00", None) if row.arch in table.baselines else None
    else:
        parts = _stat_parts(row.delta_m, delta=True)
    cells.append((parts if parts else "–", "delta_m" in row.best))
    cells.append((row.seeds, False))
    cells.append((str(row.rank) if row.rank is not None else "–", False))
    return cells


def _plain_cell(content: _Content) -> str:
    if isinstance(content, str):
        return content
    mean, std = content
    return mean if std is None else f"{mean} ± {std}"


# -- Markdown ----------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(
    tables: Sequence[Table],
    figures: Mapping[str, Sequence[Plot]] | None = None,
    *,
    source: str = "",
) -> str:
    """The report as Markdown; ``figures`` maps a table's slug to its
    :class:`~polytask.results.plots.Plot` list (images linked by file name)."""
    lines = ["# polytask report", ""]
    if source:
        lines += [f"Results store: `{source}`", ""]
    if not tables:
        lines += ["No finished runs in the store.", ""]
    for table in tables:
        lines += [f"## {table.title}", "", f"Recipe: {_format_fields(_flatten(table.recipe))}", ""]
        header = _header(table)
        lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
        for row in table.rows:
            texts = []
            for content, bold in _cells(table, row):
                text = _md_escape(_plain_cell(content))
                texts.append(f"**{text}**" if bold else text)
            lines.append("| " + " | ".join(texts) + " |")
        lines.append("")
        for note in table.notes:
            lines += [note, ""]
        for plot in (figures or {}).get(table.slug, []):
            lines += [f"![{plot.title}]({plot.path.name})", ""]
    return "\n".join(lines)


# -- LaTeX -------------------------------------------------------------------------------------

_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "−": r"$-$",
    "×": r"$\times$",
    "–": "--",
    "—": "---",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    """``text`` safe in LaTeX text mode (specials escaped, the report's symbols in math)."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_text(text: str) -> str:
    """A note: `code` spans in \\texttt, the rest escaped."""
    parts = text.split("`")
    return "".join(
        latex_escape(p) if i % 2 == 0 else r"\texttt{" + latex_escape(p) + "}"
        for i, p in enumerate(parts)
    )


def _latex_cell(content: _Content, bold: bool) -> str:
    if isinstance(content, str):
        text = latex_escape(content)
        return r"\textbf{" + text + "}" if bold else text
    mean, std = content
    body = mean if std is None else rf"{mean} \pm {std}"
    return rf"$\mathbf{{{body}}}$" if bold else f"${body}$"


def to_latex(tables: Sequence[Table], figures: Mapping[str, Sequence[Plot]] | None = None) -> str:
    """The report as a LaTeX document (``booktabs`` tables, figures by file name)."""
    lines = [
        r"\documentclass{article}",
        r"\usepackage[T1]{fontenc}",
        r"\usepackage[margin=2cm]{geometry}",
        r"\usepackage{booktabs}",
        r"\usepackage{graphicx}",
        r"\begin{document}",
        r"\section*{polytask report}",
    ]
    if not tables:
        lines.append("No finished runs in the store.")
    for table in tables:
        header = _header(table)
        lines += [
            r"\subsection*{" + latex_escape(table.title) + "}",
            r"\begin{table}[htbp]",
            r"\centering",
            r"\caption{" + latex_escape(f"{table.title}: test metrics and Δm%") + "}",
            # Shrink a table wider than the text, never enlarge a narrow one.
            r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
            r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}",
            r"\toprule",
            " & ".join(latex_escape(h) for h in header) + r" \\",
            r"\midrule",
        ]
        previous = None
        for row in table.rows:
            if previous is not None and row.arch != previous:
                lines.append(r"\midrule")
            previous = row.arch
            lines.append(
                " & ".join(_latex_cell(c, bold) for c, bold in _cells(table, row)) + r" \\"
            )
        lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
        lines.append(
            r"\noindent\textit{Recipe:} "
            + latex_escape(_format_fields(_flatten(table.recipe)))
            + r"\par\medskip"
        )
        for note in table.notes:
            lines.append(r"\noindent " + _latex_text(note) + r"\par\medskip")
        for plot in (figures or {}).get(table.slug, []):
            lines += [
                r"\begin{figure}[htbp]",
                r"\centering",
                r"\includegraphics[width=\linewidth]{" + plot.path.name + "}",
                r"\caption{" + latex_escape(plot.title) + "}",
                r"\end{figure}",
            ]
        lines.append(r"\clearpage")
    lines.append(r"\end{document}")
    return "\n".join(lines) + "\n"


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; }
th { border-bottom: 2px solid #444; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
td { text-align: right; }
tr.stl td { background: #f4f4f4; font-style: italic; }
p.note { font-size: 0.9em; color: #555; max-width: 60em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f0f0f0; padding: 0 0.2em; }
"""


def _html_text(text: str) -> str:
    parts = text.split("`")
    return "".join(
        html.escape(p) if i % 2 == 0 else "<code>" + html.escape(p) + "</code>"
        for i, p in enumerate(parts)
    )


def to_html(
    tables: Sequence[Table],
    figures: Mapping[str, Sequence[Plot]] | None = None,
    *,
    source: str = "",
) -> str:
    """The report as one self-contained HTML page (images embedded as data URIs)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><title>polytask report</title>',
        f"<style>{_CSS}</style></head>",
        "<body>",
        "<h1>polytask report</h1>",
    ]
    if source:
        out.append(f"<p>Results store: <code>{html.escape(source)}</code></p>")
    if not tables:
        out.append("<p>No finished runs in the store.</p>")
    for table in tables:
        out.append(f"<h2>{html.escape(table.title)}</h2>")
        out.append(f"<p>Recipe: {html.escape(_format_fields(_flatten(table.recipe)))}</p>")
        out.append("<table>")
        out.append(
            "<thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in _header(table))
            + "</tr></thead>"
        )
        out.append("<tbody>")
        for row in table.rows:
            cells = []
            for content, bold in _cells(table, row):
                text = html.escape(_plain_cell(content))
                cells.append(f"<td><strong>{text}</strong></td>" if bold else f"<td>{text}</td>")
            css = ' class="stl"' if row.is_stl else ""
            out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        for note in table.notes:
            out.append(f'<p class="note">{_html_text(note)}</p>')
        for plot in (figures or {}).get(table.slug, []):
            data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
            title = html.escape(plot.title)
            out.append(
                f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
                f"<figcaption>{title}</figcaption></figure>"
            )
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _public_location(location: str) -> str:
    """The store's location without the password a PostgreSQL URL may carry: reports get
    shared."""
    if "://" not in location:
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# -- the entry point -----------------------------------------------------------------------------


def write_report(
    store: ResultsStore,
    out_dir: str | Path,
    *,
    benchmarks: Sequence[str] | None = None,
    directions: Mapping[str, Mapping[str, bool]] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.tex``, ``report.html`` and the figures into ``out_dir``.

    Returns the paths written: ``"markdown"``, ``"latex"``, ``"html"``, and each figure under
    its file stem (``"synthetic_mmoe_curves"``, ...). See :func:`build_tables` for the
    arguments and errors.
    """
    from polytask.results.plots import render_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(store, benchmarks=benchmarks, directions=directions)
    figures = {table.slug: render_plots(table, store, out) for table in tables}
    paths = {
        "markdown": out / "report.md",
        "latex": out / "report.tex",
        "html": out / "report.html",
    }
    source = _public_location(store.location)
    paths["markdown"].write_text(to_markdown(tables, figures, source=source), encoding="utf-8")
    paths["latex"].write_text(to_latex(tables, figures), encoding="utf-8")
    paths["html"].write_text(to_html(tables, figures, source=source), encoding="utf-8")
    written: dict[str, Path] = dict(paths)
    for plots in figures.values():
        for plot in plots:
            written[plot.path.stem] = plot.path
    return written
