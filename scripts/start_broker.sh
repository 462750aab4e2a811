#!/usr/bin/env bash
# Start a specmq broker. Flags pass through to 'specmq broker' (see 'specmq broker --help').
# Environment overrides: SPECMQ_CONFIG (a YAML config), SPECMQ_LOG_LEVEL, SPECMQ_VENV.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
args=()
[ -n "${SPECMQ_CONFIG:-}" ] && args+=(--config "$SPECMQ_CONFIG")
[ -n "${SPECMQ_LOG_LEVEL:-}" ] && args+=(--log-level "$SPECMQ_LOG_LEVEL")
exec specmq broker "${args[@]}" "$@"
