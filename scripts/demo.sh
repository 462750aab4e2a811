#!/usr/bin/env bash
# specmq demo: broker + target + fused worker on loopback (`specmq up`), then a few Python code-completion prompts
# through BOTH architectures: `specmq draft` (local drafter, remote target) and `specmq generate` (fused worker),
# then one curl call and one `openai` client call to the OpenAI-compatible HTTP gateway (`specmq up --http`).
# Prints each completion with its acceptance rate and tokens/s, then stops everything (also on Ctrl-C or error).
# Environment: DEMO_MAX_NEW (tokens per prompt, default 48), DEMO_GAMMA (default 4), DEMO_PORT (frontend port,
# default 5555; the backend is the next port), DEMO_HTTP_PORT (gateway, default 8000), SPECMQ_VENV.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
MAX_NEW="${DEMO_MAX_NEW:-48}"
GAMMA="${DEMO_GAMMA:-4}"
PORT="${DEMO_PORT:-5555}"
HTTP_PORT="${DEMO_HTTP_PORT:-8000}"
HTTP="http://127.0.0.1:$HTTP_PORT"
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

echo "== starting broker + target + fused worker + HTTP gateway (specmq up)"
specmq up --frontend "$FRONTEND" --backend "$BACKEND" --targets 1 --fused 1 --slots 8 --jobs 8 \
  --http "$HTTP_PORT" --log-level warning >"$LOG" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do  # bounded: 120 s
  grep -q "specmq up: ready" "$LOG" && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then echo "specmq up failed:"; cat "$LOG"; exit 1; fi
  sleep 0.2
done
grep -q "specmq up: ready" "$LOG" || { echo "specmq up was not ready within 120 s:"; cat "$LOG"; exit 1; }
grep "specmq up: ready" "$LOG"

echo
echo "== distributed: local draft model, broker, remote target (specmq draft, gamma $GAMMA)"
specmq draft --broker "$FRONTEND" --prompt-file "$PROMPTS" --max-new-tokens "$MAX_NEW" --gamma "$GAMMA" \
  --concurrency 8 --threads 1 --log-level warning

echo
echo "== fused: draft and target in one worker behind the generate queue (specmq generate, gamma $GAMMA)"
specmq generate --broker "$FRONTEND" --prompt-file "$PROMPTS" --max-new-tokens "$MAX_NEW" --gamma "$GAMMA" \
  --concurrency 8 --log-level warning

echo
echo "== HTTP gateway, curl: POST $HTTP/v1/completions"
curl -sS --max-time 60 "$HTTP/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"tiny-target\", \"prompt\": \"def fibonacci(n):\\n\", \"max_tokens\": $MAX_NEW, \"temperature\": 0}"
echo

echo
echo "== HTTP gateway, the openai client: a streamed chat completion"
if python -c "import openai" 2>/dev/null; then
  python - "$HTTP" "$MAX_NEW" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
stream = client.chat.completions.create(model="tiny-target", max_tokens=int(sys.argv[2]), temperature=0, stream=True,
                                        messages=[{"role": "user", "content": "Write a function that sorts a list."}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
        if chunk.choices[0].finish_reason:
            figures = chunk.model_extra["specmq"]
            print(f"\n--- finish {chunk.choices[0].finish_reason}, accepted {figures.get('accepted')}/"
                  f"{figures.get('drafted')} draft tokens in {figures.get('rounds')} rounds")
PY
else
  echo "(the openai package is not installed: pip install openai)"
fi

echo
echo "== done; stopping"
