#!/usr/bin/env bash
# Install everything the tests need (in .venv) and run the whole suite. Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
set +e
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; fi
exit $rc
