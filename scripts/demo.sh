#!/usr/bin/env bash
# specmq demo: broker + target + fused worker on loopback (`specmq up`), then a few Python code-completion prompts
# through BOTH architectures: `specmq draft` (local drafter, remote target) and `specmq generate` (fused worker).
# Prints each completion with its acceptance rate and tokens/s, then stops everything (also on Ctrl-C or error).
# Environment: DEMO_MAX_NEW (tokens per prompt, default 48), DEMO_GAMMA (default 4), DEMO_PORT (frontend port,
# default 5555; the backend is the next port), SPECMQ_VENV.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
MAX_NEW="${DEMO_MAX_NEW:-48}"
GAMMA="${DEMO_GAMMA:-4}"
PORT="${DEMO_PORT:-5555}"
FRONTEND="tcp://127.0.0.1:$PORT"
BACKEND="tcp://127.0.0.1:$((PORT + 1))"
PROMPTS="$ROOT/examples/prompts.jsonl"
LOG="$(mktemp -t specmq-demo-up.XXXXXX)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a 2-core machine runs broker, target, fused and drafter at once

UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP_PID" 2>/dev/null || true
  fi
  rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== starting broker + target + fused worker (specmq up)"
specmq up --frontend "$FRONTEND" --backend "$BACKEND" --targets 1 --fused 1 --slots 8 --jobs 8 \
  --log-level warning >"$LOG" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do  # bounded: 120 s
  grep -q "ready" "$LOG" && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then echo "specmq up failed:"; cat "$LOG"; exit 1; fi
  sleep 0.2
done
grep -q "ready" "$LOG" || { echo "specmq up was not ready within 120 s:"; cat "$LOG"; exit 1; }
grep "ready" "$LOG"

echo
echo "== distributed: local draft model, broker, remote target (specmq draft, gamma $GAMMA)"
specmq draft --broker "$FRONTEND" --prompt-file "$PROMPTS" --max-new-tokens "$MAX_NEW" --gamma "$GAMMA" \
  --concurrency 8 --threads 1 --log-level warning

echo
echo "== fused: draft and target in one worker behind the generate queue (specmq generate, gamma $GAMMA)"
specmq generate --broker "$FRONTEND" --prompt-file "$PROMPTS" --max-new-tokens "$MAX_NEW" --gamma "$GAMMA" \
  --concurrency 8 --log-level warning

echo
echo "== done; stopping"
