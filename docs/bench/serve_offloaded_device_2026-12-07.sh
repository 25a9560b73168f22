#!/usr/bin/env bash
# BENCHMARKS "Serving offloaded: the rows on the device step": the offloaded server at a quarter
# of the shipped model's expert bytes (default policy: the shipped predictor), closed loop at 1
# and 4 clients, 8 requests each, every greedy output checked against the offline engine.
# Run it in a checkout of each commit compared (before: 67f545c), interleaved.
# usage: bash docs/bench/serve_offloaded_device_2026-12-07.sh OUTFILE.json
cd "$(dirname "$0")/../.."  # the repository root
.venv/bin/python scripts/bench_serve.py --expert-budget-frac 0.25 --modes continuous --concurrency 1,4 \
  --max-batch 4 --requests-per-client 8 --max-tokens 32 --check --out "${1:?an output file}"
