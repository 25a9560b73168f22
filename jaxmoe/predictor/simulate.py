"""Replay decode-order routing through an expert cache of fixed capacity.

  simulate_decode     every runtime policy (jaxmoe/offload/policy.py), through the
                      runtime's own decode driver (jaxmoe/offload/driver.py) and
                      Schedule: a naive model of the step program (engine/step.py)
                      says, per run, which layer misses first and what the host then
                      reads (routing ids up to it, the scorer's picks at it), and the
                      driver turns that into plans exactly as in the engine, so the
                      counts are the engine's (tests/test_simulate.py checks them,
                      batch > 1 included). Prefetches are counted as loads, not as
                      demand misses: the program that resumes waits for all copies.
  simulate_schedule   demand loads only, one plan_layer per request, for request lists
                      of any shape (Belady comparisons on tiny inputs).
  belady              MIN: on a miss evict the expert whose next use lies farthest
                      ahead; the fewest loads any policy (prefetching or not) can make
                      at this capacity.

A request is one (token, MoE layer) needing its experts resident at once; loading one
that is absent is a demand miss. Capacity counts cached experts (slots) over all layers.
`SimResult.time` turns the counts into a modelled decode time per token
(jaxmoe/offload/costs.py): a model, not a measurement.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

from jaxmoe.offload.costs import CostModel
from jaxmoe.offload.driver import Amortize, DecodeDriver, DriverConfig
from jaxmoe.offload.policy import EvictionPolicy, PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.schedule import PassPlan, Schedule

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
    hits: int = 0  # experts found cached (demand passes)
    tokens: int = 0  # decode steps replayed (simulate_decode)
    runs: int = 0  # step programs run: one per token plus one per resume
    resumes: int = 0  # runs that resumed after a layer missed
    prefill_loads: int = 0  # demand loads of the prefill, included in demand_misses
    scorer_calls: int = 0  # runs whose program ran the scorer
    map_calls: int = 0  # missed layers the expert maps predicted for
    skipped_predictions: int = 0  # tokens that did not predict (amortised)
    boundary_copies: int = 0  # token boundaries that copied (one copy call each, no program)

    @property
    def total_loads(self) -> int:
        return self.demand_misses + self.prefetch_loads

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total_loads"] = self.total_loads
        out["bytes"] = self.total_loads * self.expert_bytes
        out["hit_rate"] = 1 - self.demand_misses / self.needed if self.needed else None
        return out

    def time(self, costs: CostModel, num_layers: int, predictor_ms: float = 0.0, expert_bytes: int | None = None) -> dict:
        """Modelled decode time per token (a model, not a measurement): see CostModel.token_ms."""
        loads = self.total_loads - self.prefill_loads
        out = costs.token_ms(num_layers, self.tokens, self.resumes, loads, self.scorer_calls, predictor_ms, expert_bytes,
                             copy_calls=self.boundary_copies)  # fmt: skip
        return {**out, "label": "model"}


def decode_requests(ids: np.ndarray, moe_layers: Sequence[int]) -> list[Request]:
    """ids [n, Lm, K] -> one request per (token, MoE layer), decode order; step = token index."""
    return [
        (t, layer, tuple(sorted(set(int(e) for e in ids[t, j]))))
        for t in range(ids.shape[0])
        for j, layer in enumerate(moe_layers)
    ]


def capacity_for(budget_frac: float, num_moe_layers: int, num_experts: int) -> int:
    return int(math.floor(budget_frac * num_moe_layers * num_experts + 1e-9))


def check_capacity(requests: Sequence[Request], capacity: int) -> None:
    widest = max((len(r[2]) for r in requests), default=0)
    if capacity < widest:
        raise ValueError(f"capacity {capacity} is below one request's {widest} experts")


def simulate_schedule(
    requests: Sequence[Request], capacity: int, policy: str, staging: int | None = None, expert_bytes: int = 0
) -> SimResult:
    """Drive the runtime Schedule: demand loads only, one plan_layer per request."""
    check_capacity(requests, capacity)
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
    check_capacity(requests, capacity)
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
        res.resumes += any(key not in cache for key in keys)  # the layer would stop the step program
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
    res.tokens = len({step for step, _, _ in requests})
    return res


@dataclasses.dataclass(frozen=True)
class DecodeTrace:
    """What simulate_decode replays: per row (batch) and decode step, the routing, the
    scorer's view and the input token; optionally the routed prefill's experts."""

    ids: np.ndarray  # [B, T, Lm, K] each row's experts at each MoE layer
    scores: np.ndarray | None = None  # [B, T, Lm, E] the scorer's next-layer distribution made at each MoE layer
    tokens: np.ndarray | None = None  # [B, T] each row's input token (expert maps)
    valid: np.ndarray | None = None  # [B, T] rows still generating (default: all)
    prefill: tuple[tuple[int, ...], ...] = ()  # per MoE layer, the experts a routed prefill loads
    requests: tuple[int, ...] = (0,)  # steps at which a new request starts (begin_request)
    vectors: np.ndarray | None = None  # [len(requests), D] their semantic vectors

    @classmethod
    def single(cls, ids, scores=None, tokens=None, **kw) -> "DecodeTrace":
        """One row: ids [T, Lm, K], scores [T, R, E] (R = Lm - 1: no row for the last MoE
        layer, as in the traces), tokens [T]."""
        if scores is not None and scores.shape[1] == ids.shape[1] - 1:
            scores = np.concatenate([scores, np.zeros_like(scores[:, :1])], axis=1)
        return cls(ids[None], None if scores is None else scores[None], None if tokens is None else tokens[None], **kw)


def simulate_decode(
    trace: DecodeTrace,
    moe_layers: Sequence[int],
    num_layers: int,
    capacity: int,
    policy: str | EvictionPolicy,
    *,
    staging: int | None = None,
    prefetch_max: int = 0,
    picks: int = 0,
    costs: CostModel = CostModel(),
    amortize: Amortize = Amortize(),
    expert_bytes: int = 0,
    cost_expert_bytes: int | None = None,
    num_experts: int | None = None,
    first_step: int = 1,
) -> SimResult:
    """Replay `trace` through the runtime's decode driver and Schedule as the offloaded
    engine runs them: token by token, a run from layer 0 stops at the first MoE layer
    whose experts are not all cached, the driver plans from what that run reports (the
    scorer's top `picks` for the next layer, at the missed layer only), and the run
    resumes there. `capacity`: cache slots; `staging`: demand copies per pass (default:
    capacity); `prefetch_max`: prefetch copies per missed layer (the cache's in-flight
    room); `cost_expert_bytes`: the expert size the prefetch gate prices (default: the
    cost model's). Steps count from `first_step` (the engine's first decode step is 1).
    A policy with `boundary` prefetches between tokens (driver.end_token), in the engine's
    order: the finished token is recorded first, then the next one begins.
    """
    ids = np.asarray(trace.ids)
    b, t_count, lm, k = ids.shape
    e_count = num_experts or (trace.scores.shape[-1] if trace.scores is not None else int(ids.max()) + 1)
    requests = [(s, layer, tuple(sorted(set(int(x) for x in ids[:, s, j].ravel())))) for s in range(t_count)
                for j, layer in enumerate(moe_layers)]  # fmt: skip
    check_capacity(requests, capacity)  # a prefill wider than the cache takes several passes
    shape = PolicyShape(tuple(moe_layers), e_count, k)
    policy = make_policy(policy, shape) if isinstance(policy, str) else policy
    schedule = Schedule(capacity, capacity if staging is None else staging, policy, prefetch_max)
    config = DriverConfig(prefetch_max=prefetch_max, costs=costs, expert_bytes=cost_expert_bytes, amortize=amortize)
    driver = DecodeDriver(schedule, moe_layers, num_layers, config)
    valid = np.ones((b, t_count), bool) if trace.valid is None else np.asarray(trace.valid, bool)
    res = SimResult(policy.name, capacity, expert_bytes=expert_bytes)

    def count(plans: Sequence[PassPlan]) -> None:
        for plan in plans:
            if plan.kind == "prefetch":
                res.prefetch_loads += len(plan.loads)
            else:
                res.demand_misses += len(plan.loads)
                res.hits += len(plan.hits)
                res.prefetch_used += len(plan.prefetched_hits)

    starts = {s: i for i, s in enumerate(trace.requests)}
    for j, layer in enumerate(moe_layers[: len(trace.prefill)]):  # the routed prefill: one pass per layer
        if j == 0:
            driver.begin_request(None if trace.vectors is None else trace.vectors[0])
        plans = schedule.plan_layer(0, layer, trace.prefill[j])
        count(plans)
        res.prefill_loads += sum(len(p.loads) for p in plans)
    for t in range(t_count):
        step, live = first_step + t, valid[:, t]
        if t in starts and not (t == 0 and trace.prefill):
            if t:
                driver.end_request()
            driver.begin_request(None if trace.vectors is None else trace.vectors[starts[t]])
        tokens = None if trace.tokens is None else trace.tokens[:, t]
        driver.begin_token(step, tokens)  # a no-op where the previous token began it (dispatched ahead)
        start, planned = 0, None
        needed = {layer: {int(x) for x in ids[live, t, j].ravel()} for j, layer in enumerate(moe_layers)}
        while True:
            res.runs += 1
            res.resumes += planned is not None
            first_miss = next((layer for layer in moe_layers if layer >= start and
                               any((layer, x) not in schedule.slot_of for x in needed[layer])), num_layers)  # fmt: skip
            run_ids, run_picks, run_probs = _step_outputs(trace, ids, t, moe_layers, num_layers, start, first_miss,
                                                          picks if driver.predicting(step) else 0)  # fmt: skip
            if first_miss == num_layers:
                # A request's last token has no next one in the engine (a new generate follows).
                more = t + 1 < t_count and t + 1 not in starts
                following = trace.tokens[:, t + 1] if more and trace.tokens is not None else None
                # As the engine (engine/offloaded_decode.py): the next token begins before this
                # one is recorded where it is dispatched ahead, after it where the boundary plans.
                ahead = not policy.keep_only_current  # the engine's dispatch_ahead
                if more and ahead and not driver.boundary:
                    driver.begin_token(step + 1, following)
                count(driver.plan(step, start, first_miss, run_ids, run_picks, run_probs, live, planned).record)
                if more and ahead and driver.boundary:
                    driver.begin_token(step + 1, following)
                    count(driver.end_token(step + 1, following, live))
                break
            out = driver.plan(step, start, first_miss, run_ids, run_picks, run_probs, live, planned)
            count(out.record + out.load)
            start, planned = first_miss, first_miss
        res.tokens += 1
        res.requests += lm
        res.needed += sum(len(x) for x in needed.values())
    driver.end_request()
    res.scorer_calls, res.map_calls, res.skipped_predictions = driver.scorer_calls, driver.map_calls, driver.skipped
    res.boundary_copies = driver.boundary_copies
    return res


def _step_outputs(trace, ids, t, moe_layers, num_layers, start, first_miss, picks):
    """What the step program (engine/step.py) hands the host for a run from `start` that
    stopped at `first_miss`: ids [L, B, K] of the layers it ran (zeros elsewhere), and at
    the missed layer the scorer's top `picks` experts and probabilities [L, B, P]."""
    b, _, _, k = ids.shape
    run_ids = np.zeros((num_layers, b, k), np.int64)
    for j, layer in enumerate(moe_layers):
        if start <= layer <= first_miss:
            run_ids[layer] = ids[:, t, j]
    run_picks, run_probs = np.zeros((num_layers, b, picks), np.int64), np.zeros((num_layers, b, picks), np.float32)
    if picks and first_miss < num_layers:
        p = np.asarray(trace.scores[:, t, moe_layers.index(first_miss)], np.float32)  # [B, E]
        best = np.argsort(-p, axis=-1, kind="stable")[:, :picks]  # ties: lower id, as lax.top_k
        run_picks[first_miss], run_probs[first_miss] = best, np.take_along_axis(p, best, -1)
    return run_ids, run_picks, run_probs


def brute_force_min(requests: Sequence[Request], capacity: int) -> int:
    """The fewest demand loads over every choice of evictions (exponential: tiny inputs only)."""
    check_capacity(requests, capacity)
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
