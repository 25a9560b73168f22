#!/usr/bin/env bash
# The tests that need no torch, on the GPU image's jax (0.11.2, Python 3.12, with the CUDA
# plugin that compiles for an H100 without a GPU): the engines' exactness on the shipped
# model, the compiled programs, the deviceless GPU compile report. The main suite
# (scripts/test.sh) runs on Python 3.11, where the CPU build of torch for the parity tests
# is at hand. Sets up .venv-aot on first run (scripts/setup_aot_env.sh); arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_aot_env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1

exec "$AOT_PY" -m pytest -q -m "not e2e" "$@"
