#!/usr/bin/env bash
# The main job: set up .venv if needed, then run a small real benchmark end to end
# (configs/quickstart.toml: Multi-MNIST, single-task baselines + 7 methods x 2 seeds) and
# render its report and plots. Rerunning continues where it stopped; finished runs are reused.
# Usage: bash scripts/main.sh [--smoke]   (--smoke: 1 epoch into runs/smoke, for CI)
set -euo pipefail
if [ -z "${POLYTASK_NO_SETUP:-}" ]; then
    source "$(dirname "$0")/_setup.sh" "data"
else
    cd "$(dirname "$0")/.."  # the caller's environment already has polytask (tests)
fi
STORE=runs/quickstart/results.sqlite
OUT=runs/quickstart/checkpoints
REPORT=runs/quickstart/report
EXTRA=()
if [ "${1:-}" = "--smoke" ]; then
    STORE=runs/smoke/results.sqlite
    OUT=runs/smoke/checkpoints
    REPORT=runs/smoke/report
    EXTRA=(--epochs 1)
fi
polytask sweep configs/quickstart.toml --store "$STORE" --out "$OUT" "${EXTRA[@]}"
polytask report --store "$STORE" --out "$REPORT"
echo "report: $REPORT/report.html (and report.md, report.tex, PNG plots beside it)"
