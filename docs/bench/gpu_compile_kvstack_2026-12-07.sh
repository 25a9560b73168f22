#!/usr/bin/env bash
# Deviceless H100 counts of the decode programs for BENCHMARKS "The KV cache as one stack per
# kind of layer": at BEFORE and AFTER (commits), one JSON line per run.
# usage: bash docs/bench/gpu_compile_kvstack_2026-12-07.sh BEFORE AFTER > OUT.jsonl
cd "$(dirname "$0")/../.."  # the repository root
tmp=$(mktemp -d)
for c in "$1" "$2"; do
  git worktree add -q "$tmp/$c" "$c"
done
run() {  # commit model batch: each checkout's own code (PYTHONPATH), this checkout's .venv-aot
  (cd "$tmp/$1" && PYTHONPATH="$tmp/$1" "$OLDPWD/.venv-aot/bin/python" scripts/gpu_compile.py --model "$2" \
     --batch "$3" --json 2>/dev/null) |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['commit']='$1'; print(json.dumps(d), flush=True)"
}
for b in 1 8; do run "$1" olmoe-1b-7b $b; run "$2" olmoe-1b-7b $b; done
for m in gpt-oss-20b deepseek-v2-lite; do run "$1" $m 1; run "$2" $m 1; done
for c in "$1" "$2"; do git worktree remove --force "$tmp/$c"; done
