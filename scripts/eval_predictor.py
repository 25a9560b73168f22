"""Evaluate a predictor against the baselines and replay the traces through the cache policies.

  python scripts/eval_predictor.py --traces traces/NAME --predictor checkpoints/NAME/predictor \
      --budget-frac 0.25 [--model checkpoints/NAME] [--maps FILE] [--cost-model h200-olmoe] [--json]

On the traces the predictor was trained on, only their held-out test split is used;
on other traces, all of them. --model enables the gate_ahead baseline (the next
layer's router applied to the current router input) and the expert maps' request
maps. --maps: expert maps to start from (scripts/build_expert_maps.py; without it they
start empty and learn as the replay goes). Capacity is budget-frac x all experts, in
whole experts, the same for every policy (a prefetch lands in a cache slot, as in
the engine). Every runtime policy is replayed through the engine's own
decode driver; "time" is a modelled decode time per token from the counts
(jaxmoe/offload/costs.py, --cost-model): a model, not a measurement. --json prints one
JSON object on stdout (progress on stderr):
  {"recall": {"mlp", "gate_ahead", "prev_token", "frequency", "maps"},
   "policies": {"ondemand"|"lru"|"lfu"|"lfru"|"predictor"|"reuse"|"maps"|...|"belady":
                {"demand_misses", "total_loads", "time": {"ms_per_token", ..., "label": "model"}, ...}},
   "policy_variants": {...offline research rules...}, "time_model": {...}, ...}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # research/ lives beside the package, not in it
    sys.path.append(str(ROOT))

from jaxmoe.checkpoint import load
from jaxmoe.offload.costs import COST_MODELS, cost_model
from jaxmoe.predictor.evaluate import POLICY_RUNS, evaluate_on_traces
from jaxmoe.predictor.pipeline import INPUT_ERRORS, progress_bar, refuse, script_parser
from research.variants import EVICTIONS, simulate_variant


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--predictor", type=Path, required=True)
    p.add_argument("--budget-frac", type=float, required=True, help="cache capacity as a fraction of all experts")
    p.add_argument("--model", type=Path, help="the checkpoint the traces came from (enables gate_ahead)")
    p.add_argument("--prefetch", type=int, help="experts prefetched per layer (default: the predictor's, top_k)")
    p.add_argument("--max-tokens", type=int, help="evaluate on at most this many tokens")
    p.add_argument("--maps", type=Path, help="expert maps to start from (scripts/build_expert_maps.py)")
    p.add_argument("--cost-model", choices=sorted(COST_MODELS), default="h200-olmoe",
                   help="the figures the modelled time and the prefetch gate use")  # fmt: skip
    p.add_argument("--policies", help=f"comma list of policy runs (default all: {','.join(POLICY_RUNS)})")
    p.add_argument("--no-variants", action="store_true", help="skip the offline research variants")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 < args.budget_frac <= 1:
        print(f"error: --budget-frac {args.budget_frac} must be in (0, 1]", file=sys.stderr)
        return 2
    runs = tuple(args.policies.split(",")) if args.policies else tuple(POLICY_RUNS)
    bar = progress_bar(args, total=len(runs), desc="policies", unit="run")

    def progress(name):
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        model = load(args.model) if args.model else None
        out = evaluate_on_traces(args.traces, args.predictor, args.budget_frac, model, args.prefetch, args.max_tokens,
                                 args.maps, cost_model(args.cost_model), runs, progress)  # fmt: skip
    except INPUT_ERRORS as e:
        return refuse(e)
    finally:
        bar.close()
    if not args.no_variants:
        out["policy_variants"] = variants(args, out)
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
    print(f"\ncapacity {out['capacity_experts']} of {out['total_experts']} experts (budget {out['budget_frac']}); "
          f"time: a model ({out['time_model']['name']}), not a measurement")  # fmt: skip
    print(f"{'policy':<22}{'slots':>6}{'demand':>9}{'total':>9}{'resumes/tok':>12}{'model ms/tok':>13}"
          f"{'demand/LRU':>11}{'total/MIN':>10}{'time/LRU':>9}")  # fmt: skip
    for name, r in out["policies"].items():
        if name == "belady":
            print(f"{name:<22}{r['capacity']:>6}{r['demand_misses']:>9}{r['total_loads']:>9}")
            continue
        print(f"{name:<22}{r['slots']:>6}{r['demand_misses']:>9}{r['total_loads']:>9}{r['resumes'] / r['tokens']:>12.2f}"
              f"{r['time']['ms_per_token']:>13.2f}{r.get('demand_vs_lru', 0):>11.2f}{r['total_vs_belady']:>10.2f}"
              f"{r.get('time_vs_lru', 0):>9.2f}")  # fmt: skip
    return 0


def variants(args, out: dict) -> dict:
    """The offline research rules (research/variants.py) on the same tokens: not the runtime's."""
    from jaxmoe.predictor.baselines import mlp_scores
    from jaxmoe.predictor.store import load_predictor
    from jaxmoe.predictor.traces import TraceSet

    pred = load_predictor(args.predictor, None)
    start, stop = out["token_range"]
    arrays = TraceSet(args.traces).load(start, stop, fields=("inputs", "ids"))
    scores, m = mlp_scores(pred.module, arrays["inputs"]), pred.meta["model"]
    return {f"mlp_{ev}": simulate_variant(arrays["ids"].astype(int), scores, m["moe_layers"], out["capacity_experts"],
                                          out["prefetch_count"], m["expert_bytes"], evict=ev).to_dict()
            for ev in EVICTIONS}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
