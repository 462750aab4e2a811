#!/usr/bin/env bash
# Install everything the tests need (in .venv) and run the whole suite. Extra args go to pytest.
#   bash scripts/test.sh                  # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"    # the fast tier: about a minute on 2 cores
# @pytest.mark.slow marks tests that start processes, run a benchmark, go end to end through real models, or spend
# seconds of CPU on statistics or fuzzing.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
set +e
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; fi
exit $rc
