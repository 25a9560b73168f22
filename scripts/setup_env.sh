# Sourced by demo.sh and test.sh: create .venv (or $JAXMOE_VENV) and install jaxmoe
# with the given extras, skipping the install when nothing changed since the last one.
# A first run prints one line of progress (two on a GPU machine: which jax build it got);
# pip's output goes to a log in the venv, shown only when the install fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXMOE_VENV:-$ROOT/.venv}"
EXTRAS="$1"
GPU=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  EXTRAS="${EXTRAS:+$EXTRAS,}cuda"  # a GPU machine gets the CUDA build of jaxlib
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
STAMP="$VENV/.jaxmoe-installed-$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  LOG="$VENV/jaxmoe-install.log"
  echo "jaxmoe: installing jaxmoe${EXTRAS:+[$EXTRAS]} into $VENV (first run only, a few minutes)..." >&2
  _jaxmoe_pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" >>"$LOG" 2>&1; }
  : >"$LOG"
  if ! { _jaxmoe_pip install --upgrade pip && _jaxmoe_pip install -e "$ROOT${EXTRAS:+[$EXTRAS]}"; }; then
    cat "$LOG" >&2
    echo "jaxmoe: the install failed (pip's output above, also in $LOG)" >&2
    exit 1
  fi
  rm -f "$VENV"/.jaxmoe-installed-*
  touch "$STAMP"
  if [ -n "$GPU" ]; then  # a CPU-only jaxlib on a GPU machine would run, slowly, without saying so
    "$VENV/bin/python" -c '
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
plugin = v("jax-cuda12-plugin")
build = f"cuda12 plugin {plugin}" if plugin else "no CUDA plugin: CPU only"
print("jaxmoe: installed jax %s / jaxlib %s (%s)" % (v("jax"), v("jaxlib"), build))' >&2
  fi
fi
PY="$VENV/bin/python"
