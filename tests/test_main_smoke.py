"""The README's main command in its smoke mode (1 epoch), as CI runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_smoke_mode():
    # A store left by an earlier run would be reused (finished runs are never retrained).
    shutil.rmtree(ROOT / "runs" / "smoke", ignore_errors=True)
    env = {
        **os.environ,
        "POLYTASK_NO_SETUP": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "main.sh"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "18 of 18 jobs done or already done" in proc.stdout
    report = ROOT / "runs" / "smoke" / "report"
    assert "report: runs/smoke/report/report.html" in proc.stdout
    text = (report / "report.md").read_text()
    for method in ("ew", "uw", "famo", "mgda", "pcgrad", "cagrad", "nash_mtl"):
        assert f"| hard_sharing | {method} |" in text
    assert list(report.glob("*.png"))
