"""Opt-in approximate decode (--skip-below W, issue 41): without it offloading gives the
resident tokens; with it a missed expert whose routing weight is below W is neither fetched
nor computed, its (row, k) adds exactly zero, the other weights renormalise where the family
does, the metrics say so, fewer bytes move, and the simulator's replay counts what the engine did."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.config import MoEConfig
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.device_decode import device_policy
from jaxmoe.engine.device_step import skip_missed
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model import init_kv_cache, moe_ffn
from jaxmoe.model.experts import ExpertWeights, drop_experts, expert_ffn
from jaxmoe.offload.cache import batch_minimum_experts
from jaxmoe.offload.device_cache import DevicePolicy, skip_weight, skippable
from jaxmoe.offload.device_sim import simulate_device
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.policy import PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.schedule import Schedule

PROMPTS = [[5, 7, 9], list(range(3, 19)), [4, 0, 12, 31, 8] * 4]


@functools.cache
def setup(variant: str):
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model("olmoe", variant))
    return cfg, model, experts, HostExpertStore.from_stacks(cfg, experts)


def engine(variant, policy, extra, skip_below=0.0):
    cfg, model, _, store = setup(variant)
    budget = (batch_minimum_experts(3, store.format, cfg) + extra) * store.expert_bytes
    return OffloadedEngine(cfg, model, store, budget, policy, prefill="routed", skip_below=skip_below)


@pytest.mark.parametrize("norm", [False, True])
def test_skipped_rows_add_zero_and_the_rest_renormalise_as_the_family_does(norm):
    """The step's expert computation (skip_missed + moe_ffn over pool slots) against a hand
    reference: the kept experts only, weights as they were (OLMoE) or p_i / sum_kept p x the
    scaling factor (norm_topk_prob). Slot 0 holds NaNs: no skipped lane may read it."""
    cfg = MoEConfig(family="olmoe", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                    num_experts=6, top_k=3, expert_intermediate_size=4, moe_layers=(True,), norm_topk_prob=norm,
                    routed_scaling_factor=2.0 if norm else 1.0, dtype="float32")  # fmt: skip
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    w = ExpertWeights(jnp.asarray(rng.normal(size=(5, 8, 8)), jnp.float32),
                      jnp.asarray(rng.normal(size=(5, 4, 8)), jnp.float32))  # fmt: skip
    w = ExpertWeights(w.w_gate_up.at[0].set(jnp.nan), w.w_down.at[0].set(jnp.nan))  # an arbitrary slot's bytes
    p = np.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.05]], np.float32)  # the experts' scores, first choice first
    weights = p / p.sum(-1, keepdims=True) * 2.0 if norm else p
    rows = jnp.asarray([[1, -1, 2], [3, 4, -1]], jnp.int32)  # the pool's slots, -1 skipped
    slots, new = skip_missed(cfg, rows, jnp.asarray(weights), jnp.ones((2,), bool))
    got = moe_ffn(x, slots, new, w, 4)
    kept = np.asarray(rows) >= 0
    expect = np.zeros((2, 8), np.float32)
    for n in range(2):
        share = p[n] * kept[n] / (p[n] * kept[n]).sum() * 2.0 if norm else p[n] * kept[n]
        for k in range(3):
            if kept[n, k]:
                s = int(rows[n, k])
                expect[n] += share[k] * np.asarray(expert_ffn(x[n : n + 1], ExpertWeights(w.w_gate_up[s], w.w_down[s])))[0]
    assert np.all(np.asarray(new)[~kept] == 0)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)
    if norm:
        np.testing.assert_allclose(np.asarray(new).sum(-1), 2.0, rtol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(new)[kept], weights[kept])
    none = drop_experts(cfg, jnp.asarray(weights), jnp.zeros((2, 3), bool))
    np.testing.assert_allclose(np.asarray(none), weights, rtol=1e-6)


def test_an_expert_is_skipped_only_if_no_valid_row_needs_it():
    ids = jnp.asarray([[0, 1], [2, 1], [3, 4]], jnp.int32)
    weights = jnp.asarray([[0.6, 0.05], [0.5, 0.3], [0.9, 0.01]], jnp.float32)
    experts = jnp.arange(5, dtype=jnp.int32)
    got = skippable(experts, ids, weights, jnp.asarray([True, True, False]), 0.1)
    # 0 and 2 are first choices, 1 has weight 0.3 in row 1, 3 and 4 only in the invalid row.
    assert np.asarray(got).tolist() == [False, False, False, True, True]


def test_zero_is_exact_and_a_threshold_is_approximate_with_fewer_bytes():
    """W = 0 is the default program (tests/test_offload.py: the resident tokens at every budget)."""
    cfg, model, experts, _ = setup("wide")
    resident = ResidentEngine(cfg, model, experts).generate(PROMPTS, 12).token_ids
    exact = engine("wide", "lru", 4, skip_below=0.0).generate(PROMPTS, 12)
    assert exact.token_ids == resident
    assert exact.metrics["approximate"] is False and exact.metrics["skipped_experts_per_token"] == 0
    approx = engine("wide", "lru", 4, skip_below=0.5).generate(PROMPTS, 12)
    m = approx.metrics
    assert m["approximate"] is True and m["skip_below"] == 0.5 and m["skipped_experts_per_token"] > 0
    assert m["h2d_bytes"] < exact.metrics["h2d_bytes"]
    assert m["prefill_h2d_bytes"] == exact.metrics["prefill_h2d_bytes"]  # the prefill is exact


def test_the_host_planned_policy_refuses_it():
    with pytest.raises(ValueError, match="--skip-below"):
        engine("wide", "maps", 4, skip_below=0.1)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_a_weight_not_finite_and_non_negative_is_refused_alike_everywhere(weight):
    refusals = (lambda: skip_weight(weight), lambda: DevicePolicy("lru", skip_below=weight),
                lambda: engine("wide", "lru", 4, skip_below=weight))  # fmt: skip
    for refuse in refusals:
        with pytest.raises(ValueError, match="skip_below must be a finite weight >= 0"):
            refuse()


@pytest.mark.slow  # ~25 s: a resident forward compiled per row
def test_the_engine_equals_the_replay_with_skipping():
    """One layer, so its routing depends on the fed tokens alone: the resident model's routing
    over what the approximate engine fed, replayed through the step's cache code, gives the
    engine's counts, skipped experts included."""
    cfg, model, experts, _ = setup("single")
    eng = engine("single", "lru", 2, skip_below=0.3)
    new = 10
    result = eng.generate(PROMPTS, new)
    graphdef, state = nnx.split(model)
    ids, weights, prefill = [], [], set()
    for prompt, out in zip(PROMPTS, result.token_ids):
        fed = list(prompt) + out[:-1]
        tokens = jnp.asarray([fed], jnp.int32)
        positions = jnp.arange(len(fed), dtype=jnp.int32)[None]
        _, _, routings = nnx.merge(graphdef, state)(tokens, positions, init_kv_cache(cfg, 1, len(fed)), experts)
        r = routings[0]
        prefill.update(int(e) for e in np.asarray(r.ids)[: len(prompt)].ravel())
        ids.append(np.asarray(r.ids)[len(prompt) : len(prompt) + new - 1, None])  # [T, Lm=1, K]
        weights.append(np.asarray(r.weights)[len(prompt) : len(prompt) + new - 1, None])
    schedule = eng.cache.schedule
    planned = Schedule(schedule.num_slots, schedule.staging,
                       make_policy("lru", PolicyShape(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)))  # fmt: skip
    planned.plan_layer(0, 0, tuple(sorted(prefill)))
    sim = simulate_device(np.stack(ids), cfg.moe_layer_ids, cfg.num_layers, cfg.num_experts, schedule.num_slots,
                          device_policy(eng), slot_of=planned.slot_of, weights=np.stack(weights))  # fmt: skip
    m = result.metrics
    prefill_loads = m["prefill_h2d_bytes"] // eng.store.expert_bytes
    assert sim["skipped_experts"] > 0
    assert sim["skipped_experts"] == round(m["skipped_experts_per_token"] * 3 * (new - 1))
    assert sim["expert_misses"] == m["expert_misses"] - prefill_loads
    exact = simulate_device(np.stack(ids), cfg.moe_layer_ids, cfg.num_layers, cfg.num_experts, schedule.num_slots,
                            dataclasses.replace(device_policy(eng), skip_below=0.0), slot_of=planned.slot_of)  # fmt: skip
    assert exact["expert_misses"] > sim["expert_misses"] and exact["skipped_experts"] == 0
    with pytest.raises(ValueError, match="weights"):
        simulate_device(np.stack(ids), cfg.moe_layer_ids, cfg.num_layers, cfg.num_experts, 8, DevicePolicy("lru", skip_below=0.3))


def test_generate_and_serve_refuse_it_without_a_budget(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import generate
    import serve

    with pytest.raises(SystemExit):
        generate.parse_args(["--prompt", "a", "--skip-below", "0.1"])
    with pytest.raises(SystemExit):
        generate.parse_args(["--prompt", "a", "--expert-budget-frac", "0.5", "--skip-below", "-1"])
    with pytest.raises(SystemExit):
        serve.parse_args(["--skip-below", "0.1"])
    assert serve.parse_args(["--expert-budget-frac", "0.5", "--skip-below", "0.1"]).skip_below == 0.1
