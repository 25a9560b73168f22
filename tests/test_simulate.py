"""The cache simulator: Belady's MIN is optimal (checked by brute force) and a lower bound
for every policy; the lru/lfu replay agrees with the offloaded engine's own counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model import init_kv_cache
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import ModuleScorer
from jaxmoe.predictor import layer_pairs, load_predictor, model_summary, save_predictor
from jaxmoe.predictor.baselines import mlp_scores
from jaxmoe.predictor.store import build_module
from jaxmoe.predictor.simulate import (
    EVICTIONS,
    brute_force_min,
    capacity_for,
    decode_requests,
    simulate_belady,
    simulate_prefetch,
    simulate_schedule,
    simulate_variant,
)


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
            runs = [simulate_prefetch(ids, probs, moe, capacity, k)]
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
    r = simulate_prefetch(ids, probs["perfect"], moe, capacity, k)
    assert r.prefetch_loads > 0 and r.prefetch_used == r.prefetch_loads
    assert r.demand_misses < simulate_schedule(decode_requests(ids, moe), capacity, "lru").demand_misses
    wrong = simulate_prefetch(ids, probs["wrong"], moe, capacity, k)
    assert wrong.prefetch_used == 0 and wrong.demand_misses > r.demand_misses


@functools.cache
def _wide_olmoe():
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model("olmoe", "wide"))
    return cfg, model, experts, HostExpertStore.from_stacks(cfg, experts)


def _engine_run(policy, budget_experts, predictor=None):
    if predictor is None:
        return _cached_engine_run(policy, budget_experts)
    return _engine_run_uncached(policy, budget_experts, predictor)


@functools.cache
def _cached_engine_run(policy, budget_experts):
    return _engine_run_uncached(policy, budget_experts)


def _engine_run_uncached(policy, budget_experts, predictor=None):
    """Decode one token at a time with the real engine; return it, its result and the routing it saw."""
    cfg, model, experts, store = _wide_olmoe()
    engine = OffloadedEngine(cfg, model, store, budget_experts * store.expert_bytes, policy, predictor=predictor)
    result = engine.generate([[7]], 16)
    fed = [7] + result.token_ids[0][:-1]  # the last token is sampled, never fed back
    tokens = jnp.asarray([fed], jnp.int32)
    positions = jnp.arange(len(fed), dtype=jnp.int32)[None]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, experts: nnx.merge(graphdef, state)(tokens, positions, init_kv_cache(cfg, 1, len(fed)), experts))
    _, _, routings = forward(state, experts)
    moe = cfg.moe_layer_ids
    ids = np.stack([np.asarray(routings[l].ids) for l in moe], axis=1)  # [T, Lm, K]
    inputs = np.stack([np.asarray(routings[l].inputs) for l in moe], axis=1)  # [T, Lm, D]
    return engine, result, ids, inputs


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_replay_agrees_with_the_offloaded_engine(policy):
    engine, result, ids, _ = _engine_run(policy, 14)
    requests = decode_requests(ids, _wide_olmoe()[0].moe_layer_ids)
    executed = {}
    for plan in engine.plan:
        executed.setdefault((plan.step, plan.layer), set()).update(plan.experts)
    assert {(s, l): set(e) for s, l, e in requests} == executed
    sim = simulate_schedule(requests, engine.cache.num_slots, policy, staging=engine.cache.staging)
    assert sim.demand_misses == result.metrics["expert_misses"] > 0
    assert sim.needed - sim.demand_misses == result.metrics["expert_hits"]


def test_prefetch_replay_agrees_with_the_engine_running_the_mlp(tmp_path):
    """The engine prefetching with an (untrained, so often wrong) MLP predictor: the same tokens
    as without prefetch, and the replay of its routing and scores gives the engine's counts."""
    cfg, model, *_ = _wide_olmoe()
    meta = {"model": model_summary(cfg), "pairs": [list(p) for p in layer_pairs(cfg)], "arch": "heads",
            "width": 16, "projection": None}  # fmt: skip
    save_predictor(tmp_path / "p", build_module(meta, seed=1), meta)
    predictor = load_predictor(tmp_path / "p", cfg)
    engine, result, ids, inputs = _engine_run("predictor", 24, ModuleScorer(predictor.module))
    assert result.token_ids == _engine_run("lru", 14)[1].token_ids
    probs = mlp_scores(predictor.module, inputs)
    schedule = engine.cache.schedule
    sim = simulate_prefetch(ids, probs, cfg.moe_layer_ids, engine.cache.num_slots, schedule.prefetch_staging,
                            staging=schedule.staging, predict_from=1)  # fmt: skip
    m = result.metrics
    assert m["prefetch_issued"] > m["prefetch_used"] > 0
    assert (sim.demand_misses, sim.prefetch_loads, sim.prefetch_used) == (
        m["expert_misses"], m["prefetch_issued"], m["prefetch_used"])  # fmt: skip
