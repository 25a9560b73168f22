#!/usr/bin/env bash
# BENCHMARKS "Serving: the admission rule": the mixed workload (bench_serve.py MIXED) under each
# rule, 64 requests, Poisson arrivals, the shipped model, 8 rows; one JSON file per run.
# usage: bash docs/bench/serve_mixed_2026-12-07.sh OUTDIR
cd "$(dirname "$0")/../.."  # the repository root
out=${1:?an output directory}
mkdir -p "$out"
run() {  # rate seed rules repetition
  .venv/bin/python scripts/bench_serve.py --modes "" --schedules "$3" --mixed-rate "$1" --mixed-requests 64 \
    --max-batch 8 --seed "$2" --out "$out/rate$1-seed$2-${3//,/-}-rep$4.json" > /dev/null
}
for seed in 0 1 2 3; do run 6 $seed edf,task 1; done
run 6 0 fcfs 1
run 5 0 edf,task 1
for seed in 0 1 2 3; do run 6 $seed edf,task 2; done
