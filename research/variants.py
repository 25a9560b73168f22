"""Offline variants of prediction-driven prefetch with their own rules, to compare
eviction scores against the runtime's policies (jaxmoe/offload). Not what the runtime
does: they predict at every layer (the one-program decode can act on a prediction only
where a layer missed) and keep their own cache state instead of the runtime Schedule.
scripts/eval_predictor.py reports them under "policy_variants".
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from jaxmoe.predictor.simulate import Key, SimResult, check_capacity, decode_requests


EVICTIONS = ("prob_freq", "need_distance")


def simulate_variant(
    ids: np.ndarray,
    probs: np.ndarray,
    moe_layers: Sequence[int],
    capacity: int,
    prefetch: int,
    expert_bytes: int = 0,
    evict: str = "prob_freq",
    guard: bool = False,
) -> SimResult:
    """ids [n, Lm, K] actual routing; probs [n, R, E] predicted distribution of MoE layer j+1 made at layer j.

    Unlike the runtime, the experts predicted for layer j+1 are protected already
    during layer j's demand loads, and an expert of a layer nothing predicts (the
    first MoE layer) is scored by its share of that layer's uses so far, not 0.
    evict: "prob_freq" (FineMoE: lowest predicted probability x use count) or
    "need_distance" (lowest chance of being needed at its layer's next visit, divided
    by how many layer steps away that visit is). guard: prefetch only into a free slot
    or over a victim that scores lower than the prefetched expert.
    """
    if evict not in EVICTIONS:
        raise ValueError(f"evict={evict!r}; choose one of {EVICTIONS}")
    requests = decode_requests(ids, moe_layers)
    check_capacity(requests, capacity)
    lm, k = len(moe_layers), ids.shape[2]
    index = {layer: j for j, layer in enumerate(moe_layers)}
    prefetch = max(0, min(prefetch, capacity - k))
    cache: set[Key] = set()
    pending: set[Key] = set()  # prefetched, not yet used
    uses: collections.Counter[Key] = collections.Counter()
    visits: collections.Counter[int] = collections.Counter()
    last_prob: dict[int, np.ndarray] = {}  # layer -> latest predicted distribution over its experts
    last_use: dict[Key, int] = {}
    res = SimResult(f"variant_{evict}", capacity, expert_bytes=expert_bytes)
    tick, j_now = 0, 0

    def need(key: Key) -> float:
        """Chance `key` is among its layer's top-k at that layer's next visit."""
        layer, e = key
        if layer in last_prob:
            return min(1.0, k * float(last_prob[layer][e]))
        return uses[key] / max(1, visits[layer])

    def score(key: Key) -> float:
        if evict == "prob_freq":
            layer, e = key
            p = float(last_prob[layer][e]) if layer in last_prob else uses[key] / max(1, visits[layer])
            return p * uses[key]
        distance = (index[key[0]] - j_now - 1) % lm + 1  # layer steps until its layer runs again
        return need(key) / distance

    def victim(protected: set[Key]) -> Key | None:
        candidates = [c for c in cache if c not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda c: (score(c), last_use.get(c, -1), c))

    def evict_one(key: Key) -> None:
        cache.remove(key)
        pending.discard(key)

    for t in range(ids.shape[0]):
        for j, layer in enumerate(moe_layers):
            tick, j_now = tick + 1, j
            needed = sorted(set(int(e) for e in ids[t, j]))
            protected = {(layer, e) for e in needed}
            predicted: list[Key] = []
            if j + 1 < lm:
                nxt = moe_layers[j + 1]
                last_prob[nxt] = probs[t, j]
                predicted = [(nxt, int(e)) for e in np.argsort(-probs[t, j], kind="stable")[:prefetch]]
                protected |= set(predicted)
            for e in needed:
                key = (layer, e)
                if key in cache:
                    if key in pending:
                        pending.discard(key)
                        res.prefetch_used += 1
                    continue
                if len(cache) >= capacity:
                    evict_one(victim(protected))
                cache.add(key)
                res.demand_misses += 1
            visits[layer] += 1
            for e in needed:
                uses[(layer, e)] += 1
                last_use[(layer, e)] = tick
            for key in predicted:
                if key in cache:
                    continue
                if len(cache) >= capacity:
                    v = victim(protected)
                    if v is None or (guard and score(v) >= score(key)):
                        continue
                    evict_one(v)
                cache.add(key)
                pending.add(key)
                res.prefetch_loads += 1
            res.requests += 1
            res.needed += len(needed)
    return res
