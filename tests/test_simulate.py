"""The cache simulator: Belady's MIN is optimal (checked by brute force) and a lower bound
for every policy; the replay through the decode driver gives the offloaded engine's own
counts for every policy (in the default run at batch 3, all but ondemand and lfu)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.engine.device_decode import device_policy
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model import init_kv_cache
from jaxmoe.offload.device_cache import DEVICE_POLICIES
from jaxmoe.offload.device_sim import simulate_device
from jaxmoe.offload.driver import Amortize
from jaxmoe.offload.policy import PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.schedule import Schedule
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import ModuleScorer
from jaxmoe.predictor import layer_pairs, load_predictor, model_summary, save_predictor
from jaxmoe.predictor.baselines import mlp_scores
from jaxmoe.predictor.store import build_module
from jaxmoe.predictor.simulate import (
    DecodeTrace,
    brute_force_min,
    capacity_for,
    decode_requests,
    simulate_belady,
    simulate_decode,
    simulate_schedule,
)
from research.variants import EVICTIONS, simulate_variant


def random_ids(seed, tokens, layers, experts, k, skew=1.0):
    """[tokens, layers, k] distinct experts per (token, layer), Zipf-ish so caching matters."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** skew
    p /= p.sum()
    out = np.empty((tokens, layers, k), np.int64)
    for t in range(tokens):
        for j in range(layers):
            out[t, j] = rng.choice(experts, size=k, replace=False, p=p)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_belady_equals_brute_force_on_tiny_traces(seed):
    rng = np.random.default_rng(seed)
    layers, experts, k = int(rng.integers(1, 3)), int(rng.integers(3, 5)), int(rng.integers(1, 3))
    ids = random_ids(seed, int(rng.integers(3, 6)), layers, experts, k)
    requests = decode_requests(ids, list(range(layers)))
    for capacity in range(k, min(layers * experts, k + 3) + 1):
        assert simulate_belady(requests, capacity).total_loads == brute_force_min(requests, capacity), capacity


def test_brute_force_sees_what_lru_misses():
    # Cyclic access over capacity + 1 keys: LRU misses every time, the optimum does not.
    requests = [(t, 0, (e,)) for t, e in enumerate([0, 1, 2] * 4)]
    assert simulate_schedule(requests, 2, "lru").total_loads == 12
    assert brute_force_min(requests, 2) == simulate_belady(requests, 2).total_loads == 7


def _scorers(ids, experts, seed):
    """Next-layer predicted distributions [n, R, E]: perfect, noisy, uniform and deliberately wrong."""
    rng = np.random.default_rng(seed)
    n, lm, _ = ids.shape
    perfect = np.zeros((n, lm - 1, experts))
    np.put_along_axis(perfect, ids[:, 1:], 1.0, -1)
    noisy = perfect + rng.random(perfect.shape)
    wrong = 1.0 - perfect
    uniform = np.full(perfect.shape, 1.0)
    return {name: s / s.sum(-1, keepdims=True) for name, s in
            {"perfect": perfect, "noisy": noisy, "wrong": wrong, "uniform": uniform}.items()}  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_min_is_a_lower_bound_for_every_policy(seed):
    experts, layers, k = 8, 3, 2
    ids = random_ids(seed, 60, layers, experts, k, skew=1.2)
    moe = [0, 2, 3]  # MoE layer ids need not be contiguous
    requests = decode_requests(ids, moe)
    for frac in (0.25, 0.5, 0.75):
        capacity = capacity_for(frac, layers, experts)
        best = simulate_belady(requests, capacity).total_loads
        assert best >= len(set((layer, e) for _, layer, need in requests for e in need))  # every key loads once
        for policy in ("ondemand", "lru", "lfu"):
            assert simulate_schedule(requests, capacity, policy).total_loads >= best
        for name, probs in _scorers(ids, experts, seed).items():
            trace = DecodeTrace.single(ids, probs)
            runs = [simulate_decode(trace, moe, 4, capacity, policy, prefetch_max=k, picks=k, num_experts=experts)
                    for policy in ("predictor", "reuse", "maps")]  # fmt: skip
            runs += [simulate_variant(ids, probs, moe, capacity, k, evict=evict) for evict in EVICTIONS]
            for r in runs:
                assert r.total_loads >= best, (frac, name, r.policy)
                assert r.needed == ids.size and r.requests == len(requests)


def test_prefetch_with_a_perfect_predictor_leaves_only_first_layer_misses():
    experts, layers, k = 8, 4, 2
    ids = random_ids(0, 50, layers, experts, k)
    probs = _scorers(ids, experts, 0)
    capacity = 2 * k
    # The research variant prefetches at every layer: layers 1..3 never miss; only layer 0,
    # which nothing predicts, can.
    r = simulate_variant(ids, probs["perfect"], list(range(layers)), capacity, k)
    assert 0 < r.demand_misses <= ids[:, 0].size and r.prefetch_used == r.prefetch_loads
    wrong = simulate_variant(ids, probs["wrong"], list(range(layers)), capacity, k)
    assert wrong.demand_misses > 3 * r.demand_misses and wrong.prefetch_used == 0


def test_runtime_prefetch_acts_where_the_step_stops():
    """The runtime (one program per token) prefetches where a layer missed, the only point the
    host sees predictions: with a perfect predictor every prefetch is used and there are fewer
    misses than without prefetch; wrong predictions are never used."""
    experts, layers, k = 8, 4, 2
    ids = random_ids(0, 50, layers, experts, k)
    probs = _scorers(ids, experts, 0)
    capacity, moe = 2 * k, list(range(layers))
    run = lambda p, policy="predictor": simulate_decode(DecodeTrace.single(ids, p), moe, layers, capacity, policy,  # noqa: E731
                                                        prefetch_max=k, picks=k, num_experts=experts)  # fmt: skip
    r = run(probs["perfect"])
    assert r.prefetch_loads > 0 and r.prefetch_used == r.prefetch_loads
    assert r.demand_misses < simulate_schedule(decode_requests(ids, moe), capacity, "lru").demand_misses
    wrong = run(probs["wrong"])
    assert wrong.prefetch_used == 0 and wrong.demand_misses > r.demand_misses
    # The gated policy learns that wrong picks are never used and stops copying them.
    gated, gated_wrong = run(probs["perfect"], "reuse"), run(probs["wrong"], "reuse")
    assert gated.prefetch_used == gated.prefetch_loads > 0
    assert gated_wrong.prefetch_loads < wrong.prefetch_loads


@functools.cache
def _wide_olmoe():
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model("olmoe", "wide"))
    return cfg, model, experts, HostExpertStore.from_stacks(cfg, experts)


@functools.cache
def _untrained_mlp(tmp):
    """An untrained (so often wrong) MLP predictor for the wide test model."""
    cfg, model, *_ = _wide_olmoe()
    meta = {"model": model_summary(cfg), "pairs": [list(p) for p in layer_pairs(cfg)], "arch": "heads",
            "width": 16, "projection": None}  # fmt: skip
    save_predictor(tmp / "p", build_module(meta, seed=1), meta)
    return load_predictor(tmp / "p", cfg)


PROMPTS = [[7], [3, 9, 4], [12, 1]]


def _routing(fed: list[int]):
    return _routing_of(tuple(fed))


@functools.cache  # every policy feeds the same tokens (offloaded == resident): one compile per row
def _routing_of(fed: tuple[int, ...]):
    """A row's routing ids [T, Lm, K] and router inputs [T, Lm, D] over its fed tokens,
    from the resident model (the engine computes the same numbers)."""
    cfg, model, experts, _ = _wide_olmoe()
    tokens = jnp.asarray([fed], jnp.int32)
    positions = jnp.arange(len(fed), dtype=jnp.int32)[None]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, experts: nnx.merge(graphdef, state)(tokens, positions, init_kv_cache(cfg, 1, len(fed)), experts))
    _, _, routings = forward(state, experts)
    moe = cfg.moe_layer_ids
    ids = np.stack([np.asarray(routings[l].ids) for l in moe], axis=1)
    inputs = np.stack([np.asarray(routings[l].inputs) for l in moe], axis=1)
    return ids, inputs


def _engine_and_replay(policy, batch, budget, predictor=None, amortize=Amortize(), new=12):
    """Generate with the engine (routed prefill), then replay each row's routing, scores and
    tokens through simulate_decode with the engine's cache geometry."""
    cfg, model, _, store = _wide_olmoe()
    scorer = None if predictor is None else ModuleScorer(predictor.module)
    engine = OffloadedEngine(cfg, model, store, budget * store.expert_bytes, policy, predictor=scorer,
                             prefill="routed", amortize=amortize)  # fmt: skip
    prompts = PROMPTS[:batch]
    result = engine.generate(prompts, new)
    moe, steps = cfg.moe_layer_ids, new - 1
    ids, scores, tokens, prefill = [], [], [], [set() for _ in moe]
    for prompt, out in zip(prompts, result.token_ids):
        fed = list(prompt) + out[:-1]  # the last token is sampled, never fed back
        row_ids, inputs = _routing(fed)
        for j in range(len(moe)):
            prefill[j].update(int(e) for e in row_ids[: len(prompt), j].ravel())
        decode = slice(len(prompt) - 1 + 1, len(prompt) + steps)  # positions of decode steps 1..steps
        ids.append(row_ids[decode])
        tokens.append(np.asarray(fed)[decode])
        if predictor is not None:
            s = mlp_scores(predictor.module, inputs)[decode]
            scores.append(np.concatenate([s, np.zeros_like(s[:, :1])], axis=1))
    trace = DecodeTrace(np.stack(ids), np.stack(scores) if scores else None, np.stack(tokens),
                        prefill=tuple(tuple(sorted(p)) for p in prefill))  # fmt: skip
    schedule = engine.cache.schedule
    if policy in DEVICE_POLICIES:  # the decode step's own cache code, replayed from what the prefill left
        prefill = Schedule(schedule.num_slots, schedule.staging, make_policy(policy, _shape(cfg)))
        for j, layer in enumerate(moe):
            prefill.plan_layer(0, layer, trace.prefill[j])
        probs = None if trace.scores is None else trace.scores
        counts = simulate_device(trace.ids, moe, cfg.num_layers, cfg.num_experts, schedule.num_slots,
                                 device_policy(engine), probs=probs, slot_of=prefill.slot_of,
                                 reuse=prefill.policy.device_arrays(cfg.num_layers))  # fmt: skip
        return engine, result, counts, trace
    sim = simulate_decode(trace, moe, cfg.num_layers, schedule.num_slots, policy, staging=schedule.staging,
                          prefetch_max=schedule.prefetch_staging, picks=cfg.top_k if predictor else 0,
                          amortize=amortize, cost_expert_bytes=store.expert_bytes, num_experts=cfg.num_experts)  # fmt: skip
    return engine, result, sim, trace


# At batch 3 in the default run (one engine each, ~8 s): every policy but ondemand and lfu,
# whose exactness tests/test_offload.py checks by default and whose replay is the same code
# as lru's but for the victim order; they, batch 1 and reuse/maps without a scorer: --slow.
SLOW = pytest.mark.slow
CASES = [pytest.param("ondemand", False, marks=SLOW), ("lru", False), pytest.param("lfu", False, marks=SLOW),
         ("lfru", False), ("predictor", True),
         ("reuse", True), pytest.param("reuse", False, marks=SLOW), ("maps", True),
         pytest.param("maps", False, marks=SLOW)]  # fmt: skip


@pytest.mark.parametrize("batch", [pytest.param(1, marks=SLOW), 3])
@pytest.mark.parametrize("policy,scored", CASES)
def test_the_engine_equals_the_simulation(policy, scored, batch, tmp_path_factory):
    """The engine's counters equal the replay of the same routing through the same driver,
    for every policy, with and without a predictor; tokens stay resident's."""
    predictor = _untrained_mlp(tmp_path_factory.getbasetemp()) if scored else None
    budget = 19 if batch == 1 else 35  # 17 and 29 slots beside the gather: every policy evicts
    engine, result, sim, _ = _engine_and_replay(policy, batch, budget, predictor)
    m = result.metrics
    assert result.token_ids == _reference_tokens(batch)
    assert m["expert_misses"] > 0 and m["prefill_mode"] == "routed"
    if policy in DEVICE_POLICIES:  # misses fetched inside the step: one program and one read per token
        prefill_loads = m["expert_misses"] - sim["expert_misses"]
        assert prefill_loads == m["prefill_h2d_bytes"] // engine.store.expert_bytes
        decode = {k: m[k] - (prefill_loads if k == "expert_misses" else 0) for k in sim}
        decode["expert_hits"] = m["expert_hits"] - _prefill_hits(engine)
        assert sim == decode, (sim, decode)
        assert m["resumes_per_token"] == 0 and m["host_syncs_per_token"] == 1
        if scored and policy != "ondemand":
            assert m["prefetch_issued"] > 0
        return
    got = (sim.demand_misses, sim.hits, sim.prefetch_loads, sim.prefetch_used)
    assert got == (m["expert_misses"], m["expert_hits"], m["prefetch_issued"], m["prefetch_used"]), got
    assert sim.resumes == round(m["resumes_per_token"] * sim.tokens)
    assert (sim.scorer_calls, sim.map_calls, sim.boundary_copies) == (
        m["predictor_calls"], m["map_calls"], m["boundary_copies"])  # fmt: skip
    if scored and policy != "ondemand":
        assert m["prefetch_issued"] > 0
    if policy == "maps":  # it copies at token boundaries too (the maps learn as it runs)
        assert m["boundary_copies"] > 0


def test_amortised_prediction_runs_the_scorer_less_and_the_engine_equals_the_simulation(tmp_path_factory):
    """Predicting every other token: the engine dispatches the program without the scorer
    for the other tokens; same tokens, and the replay gives its counts."""
    predictor = _untrained_mlp(tmp_path_factory.getbasetemp())
    every = Amortize(every=2)
    engine, result, sim, trace = _engine_and_replay("predictor", 3, 35, predictor, every)
    m = result.metrics
    assert result.token_ids == _reference_tokens(3)
    assert (sim["prefetch_issued"], sim["prefetch_used"]) == (m["prefetch_issued"], m["prefetch_used"])
    assert m["predictor_skipped_tokens"] == sim["predictor_skipped_tokens"] == 5  # steps 2, 4, .., 10 of 1..11
    moe_layers_predicting = len(engine.config.moe_layer_ids) - 1
    assert m["predictor_calls"] == sim["predictor_calls"] == 6 * moe_layers_predicting  # steps 1, 3, .., 11
    # The same routing predicted on every token.
    cfg, schedule = engine.config, engine.cache.schedule
    always = simulate_device(trace.ids, cfg.moe_layer_ids, cfg.num_layers, cfg.num_experts, schedule.num_slots,
                             dataclasses.replace(device_policy(engine), every=1), probs=trace.scores)  # fmt: skip
    assert sim["predictor_calls"] < always["predictor_calls"] and always["predictor_skipped_tokens"] == 0


def _shape(cfg):
    return PolicyShape(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)


def _prefill_hits(engine) -> int:
    """Hits the routed prefill counted (its plans are the step-0 plans the engine executed)."""
    return sum(len(p.hits) for p in engine.plan if p.step == 0 and p.kind == "demand")


@functools.cache
def _reference_tokens(batch):
    from jaxmoe.engine import ResidentEngine

    cfg, model, experts, _ = _wide_olmoe()
    return ResidentEngine(cfg, model, experts).generate(PROMPTS[:batch], 12).token_ids
