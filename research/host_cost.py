"""How much host time each policy's planning takes per decode token at a model's shape.

The modelled time (jaxmoe/offload/costs.py) counts dispatches, reads and copies, not the
host's own planning (the decode driver and the schedule, plain Python). This measures
that planning on this machine's CPU: synthetic routing (Zipf-like per layer, with
runs of repeats so caching matters) and a scorer that ranks the true experts first with
probability `recall`, replayed through simulate_decode, timing only the driver's `plan`
calls. A measurement of host code, not of a GPU step.

  PYTHONPATH=. python research/host_cost.py --layers 16 --experts 64 --top-k 8 --tokens 300 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.offload.driver import DecodeDriver  # noqa: E402
from jaxmoe.offload.policies import policy_class  # noqa: E402
from jaxmoe.predictor.simulate import DecodeTrace, capacity_for, simulate_decode  # noqa: E402


def synthetic(tokens: int, layers: int, experts: int, k: int, recall: float, seed: int = 0):
    """ids [T, Lm, K], scores [T, Lm, E] (the next layer's distribution), tokens [T]."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** 0.8
    p /= p.sum()
    perms = [rng.permutation(experts) for _ in range(layers)]  # each layer's own popular experts
    ids = np.empty((tokens, layers, k), np.int64)
    for t in range(tokens):
        for j in range(layers):
            fresh = t == 0 or rng.random() > 0.3
            ids[t, j] = perms[j][rng.choice(experts, k, replace=False, p=p)] if fresh else ids[t - 1, j]
    scores = rng.random((tokens, layers, experts)) * 0.1
    for t in range(tokens):
        for j in range(layers - 1):
            hit = rng.random(k) < recall
            scores[t, j, ids[t, j + 1][hit]] += 1.0
    scores /= scores.sum(-1, keepdims=True)
    return ids, scores, rng.integers(0, 50000, tokens)


def measure(policy: str, ids, scores, tokens, budget_frac: float, layers: int, experts: int, k: int) -> dict:
    spent = {"plan": 0.0, "end_token": 0.0}  # the runs' planning; the token boundary's (maps)
    originals = {name: getattr(DecodeDriver, name) for name in spent}

    def timed(name):
        def run(self, *args, **kw):
            start = time.perf_counter()
            try:
                return originals[name](self, *args, **kw)
            finally:
                spent[name] += time.perf_counter() - start

        return run

    for name in spent:
        setattr(DecodeDriver, name, timed(name))
    try:
        capacity = capacity_for(budget_frac, layers, experts)
        scored = policy_class(policy).scorer != "none"
        room = k if scored else 0
        r = simulate_decode(DecodeTrace.single(ids, scores if scored else None, tokens), list(range(layers)), layers,
                            capacity - room, policy, prefetch_max=room, picks=k if scored else 0, num_experts=experts)  # fmt: skip
    finally:
        for name, fn in originals.items():
            setattr(DecodeDriver, name, fn)
    return {"plan_ms_per_token": 1e3 * spent["plan"] / r.tokens, "resumes_per_token": r.resumes / r.tokens,
            "plan_ms_per_resume": 1e3 * spent["plan"] / max(1, r.resumes),
            "boundary_ms_per_token": 1e3 * spent["end_token"] / r.tokens}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--budget-frac", type=float, default=0.25)
    p.add_argument("--recall", type=float, default=0.85, help="chance the scorer ranks a true expert in its top")
    p.add_argument("--policies", default="lru,lfru,predictor,reuse,maps")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ids, scores, tokens = synthetic(args.tokens, args.layers, args.experts, args.top_k, args.recall)
    out = {name: measure(name, ids, scores, tokens, args.budget_frac, args.layers, args.experts, args.top_k)
           for name in args.policies.split(",")}  # fmt: skip
    if args.json:
        print(json.dumps({"shape": vars(args), "policies": out}))
    else:
        for name, r in out.items():
            print(f"{name:<10} {r['plan_ms_per_token']:7.2f} ms/token  {r['plan_ms_per_resume']:6.2f} ms/resume  "
                  f"{r['resumes_per_token']:5.2f} resumes/token  {r['boundary_ms_per_token']:5.2f} ms/token at "
                  "the boundary")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
