#!/usr/bin/env bash
# BENCHMARKS "Serving offloaded: the rows on the device step": the offloaded server at a quarter
# of the shipped model's expert bytes (default policy: the shipped predictor), closed loop at 1
# and 4 clients, 8 requests each, every greedy output checked against the offline engine.
# usage: bash docs/bench/serve_offloaded_device_2026-12-07.sh BEFORE_TREE AFTER_TREE OUTDIR
# (checkouts of the two commits, each with its .venv). Each tree imports its own jaxmoe
# (PYTHONPATH: a venv's editable install may point at another checkout), nothing is compiled
# ahead (no persistent cache), and the runs alternate, three of each.
before=${1:?before tree}; after=${2:?after tree}; out=${3:?output directory}
mkdir -p "$out"
export JAXMOE_COMPILATION_CACHE=off
for rep in 1 2 3; do
  for side in before after; do
    tree=${!side}
    (cd "$tree" && PYTHONPATH="$tree" .venv/bin/python scripts/bench_serve.py --expert-budget-frac 0.25 \
      --modes continuous --concurrency 1,4 --max-batch 4 --requests-per-client 8 --max-tokens 32 --check \
      --out "$out/$side-$rep.json" > /dev/null)
  done
done
