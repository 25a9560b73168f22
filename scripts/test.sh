#!/usr/bin/env bash
# Run the test suite on CPU JAX; sets up .venv with the test extra on first run.
# Arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" "test"
cd "$ROOT"
export JAXMOE_REQUIRE_TORCH=1  # the test extra is installed: its parity tests must run, not skip
exec "$PY" -m pytest -q "$@"
