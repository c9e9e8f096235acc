#!/usr/bin/env bash
# The test suite: set up .venv with the test extras if needed, then ruff and pytest.
# Usage: bash scripts/test.sh [extra pytest arguments, e.g. --runslow or -k mgda]
set -euo pipefail
source "$(dirname "$0")/_setup.sh" "test,data"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
python -m pytest "$@"
