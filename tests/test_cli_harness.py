"""End to end: `polytask baselines`, `run`, `sweep` (two workers, resumable) and `report`."""

from __future__ import annotations

import pytest

from polytask.cli import main
from polytask.results import ResultsStore
from polytask.train.sweep import ConfigError, load_config

SWEEP = """
benchmark = "synthetic_mmoe"
methods = ["ew", "mgda"]
seeds = [0, 1]
workers = 2
store = "{store}"
out = "{out}"

[recipe]
epochs = 1
batch_size = 256
"""


def test_run_sweep_report(tmp_path, capsys):
    store, out = tmp_path / "r.sqlite", tmp_path / "runs"
    common = ["--store", str(store), "--out", str(out), "--epochs", "1"]
    assert main(["baselines", "synthetic_mmoe", "--seeds", "0", *common]) == 0
    assert main(["run", "synthetic_mmoe", "--method", "uw", "--seeds", "0", *common]) == 0
    # The recipe differs (batch_size): the sweep trains its own baselines.
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP.format(store=store, out=out))
    assert main(["sweep", str(config)]) == 0
    runs = ResultsStore(store).runs(status="finished")
    # 2 + 1 (run) + 4 baselines (2 tasks x 2 seeds) + 4 multi-task runs (2 methods x 2 seeds)
    assert len(runs) == 11
    capsys.readouterr()
    assert main(["sweep", str(config)]) == 0  # everything finished: nothing is retrained
    assert "already finished" in capsys.readouterr().out
    assert len(ResultsStore(store).runs()) == 11
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| shared_bottom | mgda |" in text and "| shared_bottom | uw |" in text
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000


def test_usage_errors_exit_2(tmp_path, capsys):
    store = ["--store", str(tmp_path / "r.sqlite")]
    assert main(["run", "synthetic_mmoe", "--method", "mgdaa", *store]) == 2
    assert "did you mean 'mgda'" in capsys.readouterr().err
    assert main(["run", "synthetic_mmoe", "--method", "ew", "--set", "lrr=1", *store]) == 2
    assert "unknown recipe key 'lrr'" in capsys.readouterr().err
    assert main(["run", "synthetic_mmoe", "--method", "ew", "--set", "epochs=two", *store]) == 2
    assert "expects int" in capsys.readouterr().err
    assert main(["run", "nope", "--method", "ew", *store]) == 2
    assert main(["run", "synthetic_mmoe", "--method", "ew", "--data", "rhoo=0.5", *store]) == 2
    # Δm selection needs the single-task baselines first; nothing is trained or stored.
    assert main(["run", "synthetic_mmoe", "--method", "ew", *store]) == 2
    assert "polytask baselines synthetic_mmoe" in capsys.readouterr().err
    assert ResultsStore(tmp_path / "r.sqlite").runs() == []
    config = tmp_path / "bad.toml"
    config.write_text(
        'benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseeds = [0]\n[recipe]\nepochz = 1\n'
    )
    assert main(["sweep", str(config)]) == 2
    assert "[recipe]: unknown recipe key 'epochz'" in capsys.readouterr().err
    assert main(["report", "--store", str(tmp_path / "missing.sqlite")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "synthetic_mmoe"])  # --method is required
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseed = [0]\n', "unknown key 'seed'"),
        ('benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseeds = 0\n', "seeds must be list"),
        ('benchmark = "synthetic_mmoe"\nmethods = ["eww"]\nseeds = [0]\n', "unknown method"),
        ('methods = ["ew"]\nseeds = [0]\n', "exactly one of 'benchmark'"),
        (
            'benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseeds = [0]\n[recipe]\nepoch = 1\n',
            "unknown recipe key 'epoch'",
        ),
        (
            'benchmark = "synthetic_mmoe"\nmethods = ["cagrad"]\nseeds = [0]\n'
            "[hparams.cagrad]\ncc = 1\n",
            "cc",
        ),
        ('benchmark = "synthetic_mmoe"\nmethods = ["ew"]\nseeds = [0]\nworkers = 0\n', "workers"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
