#!/usr/bin/env bash
# Deviceless H100 counts of the decode programs for BENCHMARKS "The decode step reads its weights
# in place": before (BEFORE, a commit) and after (this tree), one JSON line per run.
# usage: bash docs/bench/gpu_compile_inplace_2026-12-07.sh BEFORE_COMMIT > OUT.jsonl
cd "$(dirname "$0")/../.."  # the repository root
before=$1
tmp=$(mktemp -d)
git worktree add -q "$tmp/before" "$before"
ln -s "$PWD/.venv-aot" "$tmp/before/.venv-aot"
run() {  # tree label model batch
  (cd "$1" && .venv-aot/bin/python scripts/gpu_compile.py --model "$3" --batch "$4" --json 2>/dev/null) |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['tree']='$2'; print(json.dumps(d))"
}
for b in 1 8; do
  run "$tmp/before" "before $before" olmoe-1b-7b $b
  run . after olmoe-1b-7b $b
done
for m in qwen3-30b-a3b mixtral-8x7b gpt-oss-20b deepseek-v2-lite; do
  run "$tmp/before" "before $before" $m 1
  run . after $m 1
done
git worktree remove --force "$tmp/before"
