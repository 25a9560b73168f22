# Sourced by demo.sh and test.sh: create .venv (or $JAXMOE_VENV) and install jaxmoe
# with the given extras, skipping the install when nothing changed since the last one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXMOE_VENV:-$ROOT/.venv}"
EXTRAS="$1"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRAS="${EXTRAS:+$EXTRAS,}cuda"  # a GPU machine gets the CUDA build of jaxlib
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
STAMP="$VENV/.jaxmoe-installed-$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "installing jaxmoe${EXTRAS:+[$EXTRAS]} into $VENV (first run only)..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}" >&2
  rm -f "$VENV"/.jaxmoe-installed-*
  touch "$STAMP"
fi
PY="$VENV/bin/python"
