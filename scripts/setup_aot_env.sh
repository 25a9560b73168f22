#!/usr/bin/env bash
# A Python 3.12 environment with the GPU image's jax (0.11.2) and its CUDA plugin, for compiling
# the engine's programs for an H100/H200 without a GPU (scripts/gpu_compile.py) and for the tests
# that need that jax. Creates .venv-aot (or $JAXMOE_AOT_VENV) once; pip's output goes to its log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXMOE_AOT_VENV:-$ROOT/.venv-aot}"
# A pyenv shim named python3.12 exists even where it refuses to run (another global version):
# take the first python3.12 that answers.
PY312=""
for candidate in "$(command -v python3.12 || true)" \
    $( command -v pyenv >/dev/null 2>&1 && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null ); do
  if [ -n "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1; then PY312="$candidate"; break; fi
done
[ -n "$PY312" ] || { echo "jaxmoe: Python 3.12 not found (the CUDA plugin's wheels need it)" >&2; exit 1; }
STAMP="$VENV/.jaxmoe-aot-installed-$( (cat "$ROOT/pyproject.toml"; echo aot1) | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "jaxmoe: installing the GPU image's jax (0.11.2, CUDA plugin) into $VENV (first run only)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
  LOG="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip -q --disable-pip-version-check install \
        jax==0.11.2 jaxlib==0.11.2 jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 pytest \
        && "$VENV/bin/python" -m pip -q --disable-pip-version-check install -e "$ROOT"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2; echo "jaxmoe: the install failed (log: $LOG)" >&2; exit 1
  fi
  rm -f "$VENV"/.jaxmoe-aot-installed-*
  touch "$STAMP"
fi
AOT_PY="$VENV/bin/python"
