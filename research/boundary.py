"""What-if: prefetch at the token boundary, where the host already holds the next token.

The engine acts only where a layer misses. When a token completes, though, the host has
just read the sampled token: the next step's input. Expert maps keyed by that token
foretell its first layers well (on the shipped model its token map alone recalls 0.85 of
layer 0's experts), and layer 0 is the layer that misses most under every online policy
(nothing predicts it). This study lets the host, before dispatching the next token,
copy what the maps and the driver's cost gate choose for that token, at the price of one
copy call and one pool-write dispatch (no extra host read). The engine does not do this
(it dispatches the next token at once, engine/offloaded_decode.py); the figures here are
a simulation with a modelled time, to say whether it would pay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from jaxmoe.offload.costs import CostModel  # noqa: E402


class BoundaryPrefetch:
    """An `on_token_end` hook for simulate_decode; counts its own host points."""

    def __init__(self):
        self.events = 0  # boundaries that copied something

    def __call__(self, driver, step: int, tokens) -> list:
        maps = driver.maps
        if maps is None or tokens is None:
            return []
        layers = driver.moe_layers
        per_row = np.stack([maps.predict(int(t), {}, list(range(len(layers)))) for t in np.atleast_1d(tokens)])
        union = 1.0 - np.prod(1.0 - per_row, axis=0)  # [Lm, E]
        chosen = driver._choose_prefetch(None, {m: union[j] for j, m in enumerate(layers)})
        plans, room = [], driver.config.prefetch_max
        protect = [(m, e) for m, es in chosen for e in es]
        for m, es in chosen:
            if room <= 0:
                break
            plan = driver.schedule.plan_prefetch(step, m, es, protect, limit=room, accept=driver._accept)
            room -= len(plan.loads)
            plans.append(plan)
        self.events += any(p.loads for p in plans)
        return plans

    def extra_ms(self, costs: CostModel, tokens: int) -> float:
        """Modelled time per token of the boundary copies' own call and pool write."""
        return self.events / tokens * (costs.copy_call_ms + costs.dispatch_ms)


def main(argv=None) -> int:
    """Replay traces with the maps policy, with and without boundary prefetch; one JSON
    object on stdout:
      PYTHONPATH=. python research/boundary.py --traces T --predictor P --maps M --budget-frac F
    """
    import argparse
    import json

    from jaxmoe.offload.expert_maps import ExpertMaps
    from jaxmoe.offload.policy import PolicyShape, make_policy
    from jaxmoe.predictor.baselines import mlp_scores
    from jaxmoe.predictor.simulate import DecodeTrace, capacity_for, simulate_decode
    from jaxmoe.predictor.store import load_predictor
    from jaxmoe.predictor.traces import TraceSet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True)
    p.add_argument("--predictor", required=True)
    p.add_argument("--maps", required=True)
    p.add_argument("--budget-frac", type=float, required=True)
    p.add_argument("--max-tokens", type=int)
    args = p.parse_args(argv)
    pred = load_predictor(args.predictor, None)
    m = pred.meta["model"]
    arrays = TraceSet(args.traces).load(0, args.max_tokens, fields=("tokens", "inputs", "ids"))
    ids, count, costs = arrays["ids"].astype(np.int64), m["top_k"], CostModel()
    trace = DecodeTrace.single(ids, mlp_scores(pred.module, arrays["inputs"]), arrays["tokens"])
    shape = PolicyShape(tuple(m["moe_layers"]), m["num_experts"], m["top_k"])
    capacity = capacity_for(args.budget_frac, len(m["moe_layers"]), m["num_experts"])
    out = {}
    for name, hook in (("maps", None), ("maps+boundary", BoundaryPrefetch())):
        policy = make_policy("maps", shape, maps=ExpertMaps.load(args.maps))
        r = simulate_decode(trace, m["moe_layers"], m["num_layers"], capacity - count, policy, prefetch_max=count,
                            picks=count, num_experts=m["num_experts"], on_token_end=hook)  # fmt: skip
        t = r.time(costs, m["num_layers"])
        if hook is not None:
            t["boundary_ms"] = hook.extra_ms(costs, r.tokens)
            t["ms_per_token"] += t["boundary_ms"]
        out[name] = {**r.to_dict(), "time": t, "boundary_events": hook.events if hook else 0}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
