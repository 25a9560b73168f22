#!/usr/bin/env bash
# Generate text with the shipped default model; sets up .venv on first run.
# Arguments go to scripts/generate.py (default: a short prompt).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" ""
[ $# -gt 0 ] || set -- --prompt "The quick brown fox" --max-new-tokens 32
exec "$PY" "$ROOT/scripts/generate.py" "$@"
