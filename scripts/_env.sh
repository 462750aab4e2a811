# Sourced by the scripts: make (once) and activate the project's virtual environment, install specmq into it.
# SPECMQ_VENV overrides the location; SPECMQ_EXTRAS the extras installed (default: all). torch is pinned to its CPU
# build by scripts/constraints-cpu.txt (the library itself asks only for a torch recent enough).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPECMQ_VENV:-$ROOT/.venv}"
EXTRAS="${SPECMQ_EXTRAS:-all}"
CONSTRAINTS="$ROOT/scripts/constraints-cpu.txt"
if [ ! -x "$VENV/bin/python" ]; then
  echo "specmq: creating virtual environment in $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.specmq-installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$CONSTRAINTS" -nt "$STAMP" ]; then
  echo "specmq: installing (extras: $EXTRAS)" >&2
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned by the constraints to its CPU build; a bare requirement would pull a CUDA build.
  python -m pip install -q -c "$CONSTRAINTS" torch
  python -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi

