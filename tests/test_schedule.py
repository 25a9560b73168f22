"""The transfer schedule as plain data: built and checked without a device."""

from __future__ import annotations

import itertools

import pytest

from jaxmoe.offload.cache import BudgetError, minimum_experts, plan_geometry
from jaxmoe.offload.policy import LFU, LRU, OnDemand
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.schedule import Schedule


def test_hits_loads_and_lru_eviction():
    s = Schedule(num_slots=3, staging=3, policy=LRU())
    (p,) = s.plan_layer(0, 0, [5, 1])
    assert p.experts == (1, 5) and p.hits == () and p.loads == ((1, 0), (5, 1)) and p.evicted == ()
    (p,) = s.plan_layer(1, 1, [2])
    assert p.loads == ((2, 2),)
    (p,) = s.plan_layer(2, 0, [5, 7])  # 5 hits; 7 needs a slot: least recently used is (0, 1)
    assert p.hits == (5,) and p.loads == ((7, 0),) and p.evicted == ((0, 1),)
    assert p.slots == (1, 0)  # expert 5 stayed in slot 1, 7 took expert 1's slot


def test_lfu_keeps_the_frequent_expert():
    s = Schedule(num_slots=2, staging=2, policy=LFU())
    for step in range(3):
        s.plan_layer(step, 0, [0])
    s.plan_layer(3, 0, [1])
    (p,) = s.plan_layer(4, 0, [2])  # expert 0 used 3 times, expert 1 once: 1 goes
    assert p.evicted == ((0, 1),)


def test_ondemand_keeps_only_the_current_layer():
    s = Schedule(num_slots=8, staging=4, policy=OnDemand())
    s.plan_layer(0, 0, [0, 1])
    (p,) = s.plan_layer(0, 1, [0])
    assert set(p.evicted) == {(0, 0), (0, 1)} and p.hits == ()
    assert set(s.slot_of) == {(1, 0)}


def test_pinned_experts_are_never_evicted():
    s = Schedule(num_slots=2, staging=2, policy=LRU())
    s.plan_layer(0, 1, [0])
    s.plan_layer(1, 0, [0])
    # LRU alone would drop (1, 0), the older; it is needed by this pass, so (0, 0) goes.
    (p,) = s.plan_layer(2, 1, [0, 3])
    assert p.evicted == ((0, 0),) and p.hits == (0,)


@pytest.mark.parametrize("policy", ["ondemand", "lru", "lfu"])
def test_prefill_splits_into_passes_within_slots_and_staging(policy):
    s = Schedule(num_slots=5, staging=3, policy=make_policy(policy))
    s.plan_layer(0, 0, [0, 1])
    passes = s.plan_layer(0, 0, range(12))
    assert sorted(itertools.chain.from_iterable(p.experts for p in passes)) == list(range(12))
    for p in passes:
        assert len(p.loads) <= 3 and len(p.experts) <= 5
        assert len(set(p.slots)) == len(p.slots) and all(0 <= x < 5 for x in p.slots)
    assert len(s.slot_of) <= 5


def test_random_plans_never_exceed_the_slots():
    import random

    rng = random.Random(0)
    for policy in ("ondemand", "lru", "lfu"):
        s = Schedule(num_slots=7, staging=4, policy=make_policy(policy))
        for step in range(200):
            layer = step % 3
            for p in s.plan_layer(step, layer, rng.sample(range(16), rng.randint(1, 4))):
                resident = dict(s.slot_of)
                assert len(resident) <= 7 and len(set(resident.values())) == len(resident)
                assert all(s.slot_of[(layer, e)] == slot for e, slot in zip(p.experts, p.slots))


def test_budget_geometry():
    # Every expert fits: preloaded, nothing copied.
    assert plan_geometry(64 * 10, 10, total_experts=64, unique_max=8) == 64
    # Not every expert: a cache of what fits (copies land in slots; a decode step of up to
    # PAIR_TOKENS rows reads its experts in place, so nothing else takes room).
    assert plan_geometry(63 * 10, 10, total_experts=64, unique_max=8) == 63
    assert plan_geometry(8 * 10, 10, total_experts=64, unique_max=8) == 8  # the minimum: U
    assert minimum_experts(8, 0) == 8
    with pytest.raises(BudgetError, match="minimum working set of 80 B: 8 experts one layer can need for this "
                                          "batch, at 10 B each"):  # fmt: skip
        plan_geometry(7 * 10, 10, total_experts=64, unique_max=8)
    # A larger batch gathers its experts: every expert plus the gather preloads them all, and
    # the gather (a quantized one with its unpacked weights: 8 rows of 10 B and 8 x 35 B dense)
    # comes out of the budget.
    assert plan_geometry(72 * 10, 10, total_experts=64, unique_max=8, workspace=8) == 64
    assert plan_geometry(71 * 10, 10, total_experts=64, unique_max=8, workspace=8) == 71 - 8
    with pytest.raises(BudgetError, match="gather \\(8 experts' bytes\\)"):
        plan_geometry(15 * 10, 10, total_experts=64, unique_max=8, workspace=8)
    assert plan_geometry(60 * 10, 10, total_experts=64, unique_max=8, workspace=8 + 28) == 60 - 36
    assert minimum_experts(8, workspace=36) == 44


def test_a_quantized_gather_counts_its_unpacked_weights():
    from jaxmoe.checkpoint.random_model import TINY_OLMOE
    from jaxmoe.config import from_hf_dict
    from jaxmoe.model.experts import PAIR_TOKENS
    from jaxmoe.offload.cache import workspace_experts
    from jaxmoe.quant import DENSE, ExpertFormat

    cfg = from_hf_dict(dict(TINY_OLMOE, hidden_size=256, intermediate_size=128, dtype="bfloat16"))
    int4 = ExpertFormat("int4", 64)
    assert workspace_experts(PAIR_TOKENS, DENSE, cfg) == workspace_experts(PAIR_TOKENS, int4, cfg) == 0
    batch = PAIR_TOKENS + 1
    u = min(cfg.num_experts, batch * cfg.top_k)
    assert workspace_experts(batch, DENSE, cfg) == u
    # u packed rows, and u dense experts' bytes in whole int4 experts (rounded up)
    assert workspace_experts(batch, int4, cfg) == u + -(-u * DENSE.nbytes(cfg) // int4.nbytes(cfg))
    assert u + u * 3 < workspace_experts(batch, int4, cfg) <= u + u * 4  # int4 is ~0.28x dense


def test_demand_plan_protects_the_next_layers_predictions_while_it_can():
    schedule = Schedule(num_slots=4, staging=4, policy=make_policy("lru"))
    schedule.plan_layer(0, 1, [0, 1])  # the oldest: LRU would evict these first
    schedule.plan_layer(0, 0, [2, 3])
    [plan] = schedule.plan_layer(1, 0, [4, 5], protect=[(1, 0), (1, 1)])
    assert set(plan.evicted) == {(0, 2), (0, 3)} and {(1, 0), (1, 1)} <= set(schedule.slot_of)
    # With no other room, protection yields: the demand pass must fit.
    [plan] = schedule.plan_layer(2, 2, [6, 7, 8], protect=[(1, 0), (1, 1)])
    assert len(plan.loads) == 3 and (2, 8) in schedule.slot_of
