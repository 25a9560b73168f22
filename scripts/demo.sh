#!/usr/bin/env bash
# Generate text with the shipped default model, its experts offloaded to pinned host
# memory behind a device cache holding half of them (prefetch by the shipped predictor);
# sets up .venv on first run.
# Arguments go to scripts/generate.py instead of the defaults below.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" ""
# Sampled as a user would (greedy decoding loops on a model this small); the seed makes it repeatable.
[ $# -gt 0 ] || set -- --prompt "The king of the land sent his servants to the city, and they" --max-new-tokens 40 \
  --temperature 0.7 --top-p 0.9 --seed 0 --expert-budget-frac 0.5
exec "$PY" "$ROOT/scripts/generate.py" "$@"
