#!/usr/bin/env bash
# Deviceless H100 counts of the decode programs for BENCHMARKS "The decode step reads its weights
# in place": at BEFORE and AFTER (commits), one JSON line per run.
# usage: bash docs/bench/gpu_compile_inplace_2026-12-07.sh BEFORE AFTER > OUT.jsonl
cd "$(dirname "$0")/../.."  # the repository root
tmp=$(mktemp -d)
for c in "$1" "$2"; do
  git worktree add -q "$tmp/$c" "$c"
  ln -s "$PWD/.venv-aot" "$tmp/$c/.venv-aot"
done
run() {  # commit model batch
  (cd "$tmp/$1" && .venv-aot/bin/python scripts/gpu_compile.py --model "$2" --batch "$3" --json 2>/dev/null) |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['commit']='$1'; print(json.dumps(d), flush=True)"
}
for b in 1 8; do run "$1" olmoe-1b-7b $b; run "$2" olmoe-1b-7b $b; done
for m in qwen3-30b-a3b mixtral-8x7b gpt-oss-20b deepseek-v2-lite; do run "$1" $m 1; run "$2" $m 1; done
for c in "$1" "$2"; do git worktree remove --force "$tmp/$c"; done
