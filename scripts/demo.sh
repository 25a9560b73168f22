#!/usr/bin/env bash
# Generate text with the shipped default model, its experts offloaded to pinned host
# memory behind a device cache holding half of them (prefetch by the shipped predictor);
# sets up .venv on first run.
# Arguments go to scripts/generate.py instead of the defaults below.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" ""
[ $# -gt 0 ] || set -- --prompt "Once upon a time" --max-new-tokens 32 --expert-budget-frac 0.5
exec "$PY" "$ROOT/scripts/generate.py" "$@"
