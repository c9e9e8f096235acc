"""Reports: table numbers against hand computation, missing baselines, recipes kept apart,
LaTeX escaping, a self-contained HTML page, valid PNGs."""

from __future__ import annotations

import base64
import re
import statistics

import pytest

from polytask.results import ResultsStore, RunSpec, write_report
from polytask.results.plots import pareto_front
from polytask.results.report import (
    STL_LABEL,
    ReportError,
    build_tables,
    latex_escape,
    to_markdown,
)
from polytask.train.runner import STL, baseline_scores

DIRS = {"a/acc": True, "b/err": False}
R1 = {"epochs": 2, "lr": 0.1}
R2 = {"epochs": 2, "lr": 0.01}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def add_run(store, method, seed, test, *, hparams=None, recipe=R1, bench="toy", weights=None):
    """One finished run with made-up numbers; method runs get two epochs of curves."""
    hparams = dict(hparams or {})
    run_id = store.claim(RunSpec(bench, "net", method, seed, hparams, recipe))
    metrics = list(test)
    if method != STL or weights is not None:
        for epoch in (1, 2):
            scale = 1.0 + 0.1 * (2 - epoch)
            store.log_epoch(run_id, epoch, "val", {m: test[m] * scale for m in metrics})
            store.log_epoch(
                run_id, epoch, "train", {}, extra={"train_losses": [1.0, 1.0], "weights": weights}
            )
    store.finish(run_id, best_epoch=2, val=test, test=test, wall_time=1.0)
    return run_id


def add_baselines(store, *, recipe=R1, bench="toy", tasks=("a", "b")):
    if "a" in tasks:
        add_run(store, STL, 0, {"a/acc": 0.80}, hparams={"task": "a"}, recipe=recipe, bench=bench)
        add_run(store, STL, 1, {"a/acc": 0.84}, hparams={"task": "a"}, recipe=recipe, bench=bench)
    if "b" in tasks:
        add_run(store, STL, 0, {"b/err": 2.0}, hparams={"task": "b"}, recipe=recipe, bench=bench)
        add_run(store, STL, 1, {"b/err": 2.2}, hparams={"task": "b"}, recipe=recipe, bench=bench)


EW = [(0.82, 2.1), (0.86, 1.9), (0.84, 2.0)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """STL baselines, ew (3 seeds, with weights), mgda and pcgrad (2 seeds each, tied)."""
    s = ResultsStore(tmp_path_factory.mktemp("store") / "r.sqlite")
    add_baselines(s)
    for seed, (a, b) in enumerate(EW):
        add_run(s, "ew", seed, {"a/acc": a, "b/err": b}, weights=[1.0, 1.0])
    for method in ("mgda", "pcgrad"):
        for seed in (0, 1):
            add_run(s, method, seed, {"a/acc": 0.80, "b/err": 2.31})
    # A run that died: its numbers must not reach the table.
    s.claim(RunSpec("toy", "net", "ew", 7, {}, R1))
    s.fail(s.runs(seed=7)[0].id, "killed", status="interrupted")
    return s


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, write_report(store, out, directions={"toy": DIRS})


def hand_delta_m(a, b):
    """Δm% of one seed against the STL means (0.82, 2.1): acc higher-is-better, err not."""
    return 100 * (-(a - 0.82) / 0.82 + (b - 2.1) / 2.1) / 2


def test_table_numbers_match_hand_computation(store):
    (table,) = build_tables(store, directions={"toy": DIRS})
    rows = {row.label: row for row in table.rows}
    assert list(rows) == [STL_LABEL, "ew", "mgda", "pcgrad"]

    stl = rows[STL_LABEL]
    assert stl.metrics["a/acc"].mean == pytest.approx(0.82)
    assert stl.metrics["a/acc"].std == pytest.approx(statistics.stdev([0.80, 0.84]))
    assert stl.metrics["b/err"].mean == pytest.approx(2.1)
    assert table.baselines["net"] == pytest.approx({"a/acc": 0.82, "b/err": 2.1})
    # The same baselines the runner selects checkpoints with.
    assert table.baselines["net"] == pytest.approx(
        baseline_scores(store, "toy", "net", "test", ["a", "b"], R1)
    )

    ew = rows["ew"]
    assert ew.metrics["a/acc"].mean == pytest.approx(0.84)
    assert ew.metrics["a/acc"].std == pytest.approx(0.02)
    assert ew.metrics["b/err"].mean == pytest.approx(2.0)
    assert ew.metrics["b/err"].std == pytest.approx(0.1)
    per_seed = [hand_delta_m(a, b) for a, b in EW]
    assert per_seed[0] == pytest.approx(0.0)
    assert ew.delta_m.values == pytest.approx(tuple(per_seed))
    assert ew.delta_m.mean == pytest.approx(statistics.fmean(per_seed))
    assert ew.delta_m.std == pytest.approx(statistics.stdev(per_seed))
    assert ew.delta_m.n == 3

    mgda, pcgrad = rows["mgda"], rows["pcgrad"]
    assert mgda.delta_m.mean == pytest.approx(hand_delta_m(0.80, 2.31))
    assert mgda.delta_m.mean > 0  # worse than the single-task networks
    # Competition ranking: the tie shares rank 2.
    assert (ew.rank, mgda.rank, pcgrad.rank) == (1, 2, 2)
    assert stl.rank is None
    # The per-metric gains behind the bar plot: positive is better, in percent.
    assert ew.improvement["a/acc"].mean == pytest.approx(100 * (0.84 - 0.82) / 0.82)
    assert ew.improvement["b/err"].mean == pytest.approx(-100 * (2.0 - 2.1) / 2.1)
    assert ew.best == {"a/acc", "b/err", "delta_m"}


def test_markdown_table_cells(store):
    tables = build_tables(store, directions={"toy": DIRS})
    text = to_markdown(tables)
    assert "| Arch | Method | a/acc ↑ | b/err ↓ | Δm% ↓ | Seeds | Rank |" in text
    assert "| net | STL (single-task) | 0.8200 ± 0.0283 | 2.100 ± 0.141 | 0.00 | 2 | – |" in text
    dm = statistics.fmean(hand_delta_m(a, b) for a, b in EW)
    sd = statistics.stdev(hand_delta_m(a, b) for a, b in EW)
    assert (
        f"| net | ew | **0.8400 ± 0.0200** | **2.000 ± 0.100** | **{dm:+.2f} ± {sd:.2f}** | 3 | 1 |"
        in text
    )
    mgda = f"{hand_delta_m(0.8, 2.31):+.2f} ± 0.00"
    assert f"| net | mgda | 0.8000 ± 0.0000 | 2.310 ± 0.000 | {mgda} | 2 | 2 |" in text
    assert "lower is better" in text
    assert "1 interrupted run(s)" in text


def test_missing_baselines_say_so_instead_of_a_number(tmp_path):
    s = ResultsStore(tmp_path / "r.sqlite")
    add_baselines(s, tasks=("a",))  # task b has no single-task run
    add_run(s, "ew", 0, {"a/acc": 0.9, "b/err": 1.0})
    (table,) = build_tables(s, directions={"toy": DIRS})
    ew = next(r for r in table.rows if r.label == "ew")
    assert ew.delta_m is None and ew.rank is None and not ew.improvement
    assert table.baselines == {}
    text = to_markdown([table])
    assert "Δm: no single-task baselines in the store (run `polytask baselines toy`)" in text
    assert "`b`" in text
    assert "| net | ew | 0.9000 | 1.000 | – | 1 | – |" in text


def test_recipes_and_hyperparameters_are_not_averaged_together(tmp_path):
    s = ResultsStore(tmp_path / "r.sqlite")
    add_baselines(s, recipe=R1)
    add_run(s, "ew", 0, {"a/acc": 0.90, "b/err": 1.0}, recipe=R1)
    add_run(s, "ew", 0, {"a/acc": 0.50, "b/err": 3.0}, recipe=R2)
    add_run(s, "cagrad", 0, {"a/acc": 0.7, "b/err": 2.0}, hparams={"c": 0.4}, recipe=R1)
    add_run(s, "cagrad", 1, {"a/acc": 0.8, "b/err": 2.0}, hparams={"c": 0.5}, recipe=R1)
    t1, t2 = build_tables(s, directions={"toy": DIRS})
    assert (t1.recipe, t2.recipe) == (R1, R2)
    assert t1.recipe_label == "recipe: lr=0.1" and t2.recipe_label == "recipe: lr=0.01"
    assert t1.slug != t2.slug
    ew1 = next(r for r in t1.rows if r.label == "ew")
    ew2 = next(r for r in t2.rows if r.label == "ew")
    assert ew1.metrics["a/acc"].values == (0.90,) and ew2.metrics["a/acc"].values == (0.50,)
    # The baselines were trained with R1 only: R2's runs get no Δm from them.
    assert ew1.delta_m is not None and ew2.delta_m is None
    # Other hyper-parameters, other rows (ranked: c=0.5 has the lower Δm).
    assert [r.label for r in t1.rows] == [STL_LABEL, "ew", "cagrad (c=0.5)", "cagrad (c=0.4)"]
    assert all(r.metrics["a/acc"].n == 1 for r in t1.rows if r.method == "cagrad")
    text = to_markdown([t1, t2])
    assert "## toy (recipe: lr=0.1)" in text and "## toy (recipe: lr=0.01)" in text


def test_latex_escapes_and_uses_booktabs(tmp_path):
    dirs = {"seg_1/acc%": True, "b&c/err#": False}
    s = ResultsStore(tmp_path / "r.sqlite")
    for seed in (0, 1):
        add_run(s, "nash_mtl", seed, {"seg_1/acc%": 0.5 + seed / 10, "b&c/err#": 1.0}, bench="my_b")
    paths = write_report(s, tmp_path / "out", directions={"my_b": dirs})
    tex = paths["latex"].read_text()
    assert r"\usepackage{booktabs}" in tex
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"seg\_1/acc\% $\uparrow$" in tex and r"b\&c/err\# $\downarrow$" in tex
    assert r"nash\_mtl" in tex and r"my\_b" in tex
    assert r"$0.5500 \pm 0.0707$" in tex
    for line in tex.splitlines():
        if r"\includegraphics" in line:
            continue  # file names are not text: graphicx takes them as they are
        body = line[:-1] if line.endswith("{%") else line  # the one deliberate comment
        assert not re.search(r"(?<!\\)[_&#%]", body.replace(" & ", " ")), line
    assert latex_escape("a_b & c%") == r"a\_b \& c\%"
    assert latex_escape("x\\y{z}~^$") == (
        r"x\textbackslash{}y\{z\}\textasciitilde{}\textasciicircum{}\$"
    )


def test_html_is_self_contained_and_embeds_the_images(report):
    _, paths = report
    page = paths["html"].read_text()
    pngs = [p for k, p in paths.items() if p.suffix == ".png"]
    assert pngs
    assert not re.search(r"https?://|<link|<script|@import|url\(", page)
    targets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert targets and all(t.startswith("data:image/png;base64,") for t in targets)
    embedded = {base64.b64decode(t.split(",", 1)[1]) for t in targets}
    assert embedded == {p.read_bytes() for p in pngs}
    assert "<style>" in page and "0.8400 ± 0.0200" in page


def test_pngs_are_valid_and_linked(report):
    out, paths = report
    assert {"markdown", "latex", "html"} <= set(paths)
    assert {k for k, p in paths.items() if p.suffix == ".png"} == {
        "toy_net_curves",
        "toy_net_weights",
        "toy_vs_stl",
        "toy_pareto",
    }
    from matplotlib.image import imread

    markdown = paths["markdown"].read_text()
    for path in paths.values():
        assert path.parent == out and path.exists()
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
            height, width, _ = imread(path).shape
            assert height > 200 and width > 300
            assert f"]({path.name})" in markdown


def test_figures_without_data_are_left_out(tmp_path):
    s = ResultsStore(tmp_path / "r.sqlite")
    three = {"a/acc": True, "b/err": False, "c/err": False}
    add_run(s, "mgda", 0, {"a/acc": 0.9, "b/err": 1.0, "c/err": 1.0})  # no weights, no STL
    paths = write_report(s, tmp_path / "out", directions={"toy": three})
    # No weights recorded, no baselines, three tasks: only the curves.
    assert [k for k, p in paths.items() if p.suffix == ".png"] == ["toy_net_curves"]


def test_pareto_front_by_hand():
    points = [(1.0, 1.0), (2.0, 0.0), (0.0, 0.0), (2.0, 2.0), (0.5, 3.0)]
    assert pareto_front(points, [True, True]) == [False, False, False, True, True]
    # x higher-is-better, y lower-is-better: (2, 0) beats every other point on both.
    assert pareto_front(points, [True, False]) == [False, True, False, False, False]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], [True, True]) == [True, True]  # ties


def test_bad_requests_name_the_problem(store, tmp_path):
    with pytest.raises(ReportError, match=r"'nope'.*no finished run"):
        build_tables(store, benchmarks=["nope"], directions={"toy": DIRS})
    with pytest.raises(ReportError, match=r"not registered.*directions="):
        build_tables(store)  # "toy" is not a registered benchmark
    with pytest.raises(ReportError, match=r"run #\d+ \(toy, net, .*has test metrics \["):
        build_tables(store, directions={"toy": {"a/acc": True, "b/f1": True}})
    empty = ResultsStore(tmp_path / "empty.sqlite")
    paths = write_report(empty, tmp_path / "out")
    assert "No finished runs" in paths["markdown"].read_text()


def test_a_diverged_run_is_reported_not_averaged_into_delta_m(tmp_path):
    s = ResultsStore(tmp_path / "r.sqlite")
    add_baselines(s)
    add_run(s, "ew", 0, {"a/acc": 0.9, "b/err": 2.0})
    bad = add_run(s, "uw", 0, {"a/acc": float("nan"), "b/err": 2.0})
    paths = write_report(s, tmp_path / "out", directions={"toy": DIRS})
    (table,) = build_tables(s, directions={"toy": DIRS})
    uw = next(r for r in table.rows if r.label == "uw")
    ew = next(r for r in table.rows if r.label == "ew")
    assert uw.delta_m is None and uw.rank is None and ew.rank == 1
    assert "b/err" in uw.best and "a/acc" in ew.best  # NaN is never best
    text = paths["markdown"].read_text()
    assert f"run(s) #{bad} have non-finite test metrics" in text
    assert "| net | uw | nan | **2.000** | – | 1 | – |" in text  # tied best error


def test_a_postgres_password_stays_out_of_the_report():
    from polytask.results.report import _public_location

    assert _public_location("postgresql://me:s3cret@db:5432/runs") == "postgresql://me@db:5432/runs"
    assert _public_location("/data/results.sqlite") == "/data/results.sqlite"
