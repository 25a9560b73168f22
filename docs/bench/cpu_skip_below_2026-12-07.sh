#!/usr/bin/env bash
# BENCHMARKS "Approximate decode (--skip-below)": the shipped model on GPL-3's text (held out: not in the
# training corpus), teacher forced through the offloaded decode, lru at 25% of the expert bytes, batch 1;
# the resident perplexity first. One JSON line per run.
cd "$(dirname "$0")/../.."  # the repository root
PY=${PY:-.venv/bin/python}
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
WINDOWS=${WINDOWS:-24}
$PY scripts/eval_moe.py --text "$TEXT" --max-windows "$WINDOWS" --json 2>/dev/null
for w in 0 0.05 0.1 0.15 0.2 0.3; do
  $PY scripts/eval_moe.py --text "$TEXT" --max-windows "$WINDOWS" --expert-budget-frac 0.25 --policy lru \
    --skip-below $w --json 2>/dev/null
done
