"""Replay a decode-order routing sequence through an expert cache of fixed capacity.

The sequence is one request per (token, MoE layer), in decode order: token t's
MoE layers in order, then token t+1's. A request needs its experts resident at
once; loading one that is absent is a demand miss (the step waits for it).
Capacity counts cached experts (slots) over all layers.

  ondemand, lru, lfu  the runtime's own Schedule and policies (jaxmoe/offload),
                      driven exactly as the offloaded engine drives them
  predictor           the runtime's Schedule with its PredictorAware policy
                      (simulate_prefetch): after layer j's demand loads, the
                      top-P predicted experts of layer j+1 are prefetched;
                      eviction never takes what the pass needs or what is
                      predicted for j+1, and otherwise takes the lowest predicted
                      probability x (uses + 1) (FineMoE), ties least recent.
                      Prefetches are assumed to arrive before layer j+1 needs
                      them (they count as loads, not as demand misses).
  simulate_variant    offline variants of prediction-driven prefetch with their
                      own rules (see its docstring), to compare eviction scores;
                      not what the runtime does.
  belady              MIN: on a miss evict the expert whose next use lies
                      farthest ahead; the fewest loads any policy (prefetching
                      or not) can make at this capacity.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

from jaxmoe.offload.policy import make_policy
from jaxmoe.offload.schedule import Schedule

Key = tuple[int, int]  # (layer, expert)
Request = tuple[int, int, tuple[int, ...]]  # (step, layer, experts needed)


@dataclasses.dataclass
class SimResult:
    policy: str
    capacity: int
    requests: int = 0  # (token, layer) requests replayed
    needed: int = 0  # experts requested, summed over requests
    demand_misses: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0  # prefetched experts that a later request used before eviction
    expert_bytes: int = 0

    @property
    def total_loads(self) -> int:
        return self.demand_misses + self.prefetch_loads

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total_loads"] = self.total_loads
        out["bytes"] = self.total_loads * self.expert_bytes
        out["hit_rate"] = 1 - self.demand_misses / self.needed if self.needed else None
        return out


def decode_requests(ids: np.ndarray, moe_layers: Sequence[int]) -> list[Request]:
    """ids [n, Lm, K] -> one request per (token, MoE layer), decode order; step = token index."""
    return [
        (t, layer, tuple(sorted(set(int(e) for e in ids[t, j]))))
        for t in range(ids.shape[0])
        for j, layer in enumerate(moe_layers)
    ]


def capacity_for(budget_frac: float, num_moe_layers: int, num_experts: int) -> int:
    return int(math.floor(budget_frac * num_moe_layers * num_experts + 1e-9))


def _check_capacity(requests: Sequence[Request], capacity: int) -> None:
    widest = max((len(r[2]) for r in requests), default=0)
    if capacity < widest:
        raise ValueError(f"capacity {capacity} is below one request's {widest} experts")


def simulate_schedule(
    requests: Sequence[Request], capacity: int, policy: str, staging: int | None = None, expert_bytes: int = 0
) -> SimResult:
    """Drive the runtime Schedule: demand loads only, one plan_layer per request."""
    _check_capacity(requests, capacity)
    staging = capacity if staging is None else staging
    schedule = Schedule(capacity, staging, make_policy(policy))
    res = SimResult(policy, capacity, expert_bytes=expert_bytes)
    for step, layer, needed in requests:
        for plan in schedule.plan_layer(step, layer, needed):
            res.demand_misses += len(plan.loads)
        res.requests += 1
        res.needed += len(needed)
    return res


def simulate_belady(requests: Sequence[Request], capacity: int, expert_bytes: int = 0) -> SimResult:
    _check_capacity(requests, capacity)
    uses: dict[Key, list[int]] = collections.defaultdict(list)
    for s, (_, layer, needed) in enumerate(requests):
        for e in needed:
            uses[(layer, e)].append(s)
    ptr: dict[Key, int] = collections.defaultdict(int)  # index of the key's next use in uses[key]
    cache: set[Key] = set()
    res = SimResult("belady", capacity, expert_bytes=expert_bytes)

    def next_use(key: Key) -> float:
        i = ptr[key]
        return uses[key][i] if i < len(uses[key]) else math.inf

    for s, (_, layer, needed) in enumerate(requests):
        keys = [(layer, e) for e in needed]
        for key in keys:
            ptr[key] += 1  # this use is now past: next_use() looks beyond s
        for key in keys:
            if key in cache:
                continue
            if len(cache) >= capacity:
                victim = max((k for k in cache if k[0] != layer or k[1] not in needed), key=lambda k: (next_use(k), k))
                cache.remove(victim)
            cache.add(key)
            res.demand_misses += 1
        res.requests += 1
        res.needed += len(needed)
    return res


def simulate_prefetch(
    ids: np.ndarray,
    probs: np.ndarray,
    moe_layers: Sequence[int],
    capacity: int,
    prefetch: int,
    staging: int | None = None,
    expert_bytes: int = 0,
    predict_from: int = 0,
) -> SimResult:
    """The runtime's predictor policy: Schedule + PredictorAware, driven as the offloaded engine drives them.

    ids [n, Lm, K] actual routing; probs [n, R, E] the predicted distribution of MoE
    layer j+1, made at layer j. Where layer j misses an expert (the one-program decode
    stops there and loads), the top-`prefetch` predictions for layer j+1 are observed
    by the policy, layer j's demand is planned with them protected, and they are planned
    as a prefetch, protecting layer j's experts. Tokens before `predict_from` predict
    nothing (the engine's prefill).
    """
    requests = decode_requests(ids, moe_layers)
    _check_capacity(requests, capacity)
    schedule = Schedule(capacity, capacity if staging is None else staging, make_policy("predictor"), prefetch)
    res = SimResult("predictor", capacity, expert_bytes=expert_bytes)
    lm = len(moe_layers)
    for t in range(ids.shape[0]):
        for j, layer in enumerate(moe_layers):
            needed = requests[t * lm + j][2]
            ranked = []
            missed = any((layer, int(e)) not in schedule.slot_of for e in needed)
            if missed and j + 1 < lm and t >= predict_from and prefetch > 0:  # a layer predicts where it missed
                p = probs[t, j]
                ranked = [int(e) for e in np.argsort(-p, kind="stable")[:prefetch]]
                schedule.policy.observe(moe_layers[j + 1], {e: float(p[e]) for e in ranked})
            protect = [(moe_layers[j + 1], e) for e in ranked]
            for plan in schedule.plan_layer(t, layer, needed, protect):
                res.demand_misses += len(plan.loads)
                res.prefetch_used += len(plan.prefetched_hits)
            if ranked:
                this_layer = [(layer, int(e)) for e in needed]
                res.prefetch_loads += len(schedule.plan_prefetch(t, moe_layers[j + 1], ranked, this_layer).loads)
            res.requests += 1
            res.needed += len(needed)
    return res


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
    _check_capacity(requests, capacity)
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


def brute_force_min(requests: Sequence[Request], capacity: int) -> int:
    """The fewest demand loads over every choice of evictions (exponential: tiny inputs only)."""
    _check_capacity(requests, capacity)
    reqs = [frozenset((layer, e) for e in needed) for _, layer, needed in requests]

    @functools.lru_cache(maxsize=None)
    def go(s: int, cache: frozenset) -> int:
        if s == len(reqs):
            return 0
        need = reqs[s]
        missing = need - cache
        over = len(cache) + len(missing) - capacity
        best = math.inf
        for evicted in itertools.combinations(sorted(cache - need), max(0, over)):
            best = min(best, len(missing) + go(s + 1, (cache - frozenset(evicted)) | need))
        return best

    return go(0, frozenset())
