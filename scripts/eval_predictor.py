"""Evaluate a predictor against the baselines and replay the traces through the cache policies.

  python scripts/eval_predictor.py --traces traces/NAME --predictor checkpoints/NAME/predictor \
      --budget-frac 0.25 [--model checkpoints/NAME] [--json]

On the traces the predictor was trained on, only their held-out test split is used;
on other traces, all of them. --model enables the gate_ahead baseline (the next
layer's router applied to the current router input). Capacity is budget-frac x all
experts, in whole experts. --json prints one JSON object on stdout:
  {"recall": {"mlp", "gate_ahead", "prev_token", "frequency"},
   "policies": {"ondemand"|"lru"|"lfu"|"predictor"|"belady": {"demand_misses", "total_loads", ...}}, ...}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import jaxmoe  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint import CheckpointError, load
from jaxmoe.config import ConfigError
from jaxmoe.predictor.pipeline import evaluate_on_traces
from jaxmoe.predictor.store import PredictorMismatch
from jaxmoe.predictor.traces import TraceError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--predictor", type=Path, required=True)
    p.add_argument("--budget-frac", type=float, required=True, help="cache capacity as a fraction of all experts")
    p.add_argument("--model", type=Path, help="the checkpoint the traces came from (enables gate_ahead)")
    p.add_argument("--prefetch", type=int, help="experts prefetched per layer (default: the predictor's, top_k)")
    p.add_argument("--max-tokens", type=int, help="evaluate on at most this many tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 < args.budget_frac <= 1:
        print(f"error: --budget-frac {args.budget_frac} must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        model = load(args.model) if args.model else None
        out = evaluate_on_traces(args.traces, args.predictor, args.budget_frac, model, args.prefetch, args.max_tokens)
    except (CheckpointError, ConfigError, TraceError, PredictorMismatch, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
        return 0
    p = out["prefetch_count"]
    print(f"{out['tokens']} tokens ({out['split']}), top_k={out['top_k']}, prefetch {p}", file=sys.stdout)
    print(f"{'predictor':<12}{'recall@k':>10}{f'recall@{p}':>11}{f'prec@{p}':>10}")
    for name, r in out["recall"].items():
        if r is None:
            print(f"{name:<12}{'n/a':>10}  ({out['notes'].get(name, '')})")
            continue
        print(f"{name:<12}{r:>10.4f}{out['recall_at_prefetch'][name]:>11.4f}{out['precision_at_prefetch'][name]:>10.4f}")
    print(f"\ncapacity {out['capacity_experts']} of {out['total_experts']} experts (budget {out['budget_frac']})")
    print(f"{'policy':<20}{'demand misses':>14}{'total loads':>13}{'MB moved':>10}")
    for name, r in out["policies"].items():
        print(f"{name:<20}{r['demand_misses']:>14}{r['total_loads']:>13}{r['bytes'] / 1e6:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
