#!/usr/bin/env bash
# The CPU rows of BENCHMARKS "Misses inside the step program": 3 interleaved runs of each row, one JSON line per run.
# usage: bash docs/bench/cpu_device_decode_2026-12-07.sh [ROW ...]   (default: every row; a row: resident, or "POLICY FRAC")
cd "$(dirname "$0")/../.."  # the repository root
ROWS=("$@")
[ ${#ROWS[@]} -eq 0 ] && ROWS=("resident" "lru 0.25" "lru 0.5" "predictor 0.25" "predictor 0.5" "lfu 0.25" "lfru 0.25" "ondemand 0.25" "reuse 0.25")
P="The king of the land sent his servants to the city, and they"
for rep in 1 2 3; do
for a in "${ROWS[@]}"; do
  set -- $a
  if [ "$1" = resident ]; then args="--policy lru"; else args="--policy $1 --expert-budget-frac $2"; fi
  [ "$1" = resident ] && args=""
  .venv/bin/python scripts/generate.py --prompt "$P" --max-new-tokens 128 --temperature 0 $args --json 2>/dev/null | python3 -c "
import json,sys; d=json.load(sys.stdin); m=d['metrics']
print(json.dumps({'rep':$rep,'row':'$a','tpot_ms':m['tpot_ms'],'hit_rate':m['hit_rate'],'syncs':m['host_syncs_per_token'],'resumes':m['resumes_per_token'],'misses':m['expert_misses'],'prefetch':m['prefetch_issued'],'tokens':d['outputs'][0]['token_ids'][-8:]}))"
done; done
