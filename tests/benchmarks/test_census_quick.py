"""The Census-Income benchmark's quick mode trains every model and writes its table (the
numbers of a 1-epoch run on 3,000 rows are not checked, only that they are AUCs)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _benchmark():
    # In-process rather than a subprocess: importing torch again would be most of the time.
    spec = importlib.util.spec_from_file_location(
        "census_experts", ROOT / "benchmarks" / "census_experts.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["census_experts"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_a_table(tmp_path):
    out = tmp_path / "census.md"
    threads = torch.get_num_threads()
    try:
        assert _benchmark().main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "--quick mode" in text
    for heading in ("## Setup", "## Results (test AUC)", "## What the papers report"):
        assert heading in text
    for arch in ("shared_bottom", "omoe", "mmoe", "ple"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {arch} |"))
        aucs = [float(v) for v in re.findall(r"(\d\.\d{4}) ± ", row)]
        assert len(aucs) == 2 and all(0.0 <= a <= 1.0 for a in aucs), row
    # The papers' numbers are quoted beside ours.
    assert "| MMoE | 0.9410 | 0.9359 | 0.9926 | 0.9927 |" in text
    assert "| PLE | 0.9522 | +0.0078 | 0.9945 | +0.0022 |" in text
