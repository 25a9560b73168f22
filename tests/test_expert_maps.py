"""Expert maps, the reuse policy, the cost model and the driver's prefetch gate, without a
device; the vectorised map prediction against a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.offload.costs import CostModel, cost_model
from jaxmoe.offload.driver import Amortize, DecodeDriver, DriverConfig
from jaxmoe.offload.expert_maps import ExpertMaps, MapsConfig, MapsMismatch
from jaxmoe.offload.policy import LFRU, PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.reuse import ReuseAware
from jaxmoe.offload.schedule import Schedule
from jaxmoe.predictor.simulate import DecodeTrace, simulate_decode

SHAPE = PolicyShape((0, 1, 2, 3), 8, 2)


def random_maps(seed=0, tokens=400, layers=4, experts=8, vocab=30, **config) -> ExpertMaps:
    rng = np.random.default_rng(seed)
    maps = ExpertMaps(layers, experts, 2, MapsConfig(**config))
    for _ in range(tokens):
        maps.add_token(int(rng.integers(vocab)), [list(rng.choice(experts, 2, replace=False)) for _ in range(layers)])
    return maps


def naive_predict(maps: ExpertMaps, token, prefix, target) -> np.ndarray:
    """One target, one known expert at a time: the definition predict() vectorises."""
    s = maps.config.shrink
    prior = maps.layer_counts[target] / maps.tokens_seen
    parts = []
    if token is not None and token in maps.token_counts:
        row = maps.token_counts[token][target].astype(float)
        parts.append(((row + s * prior) / (maps.token_visits[token] + s), maps.config.token_weight))
    acc, weight = np.zeros(maps.e), 0.0
    for i, ids in prefix.items():
        if i == target:
            continue
        w = maps.config.layer_decay ** (abs(target - i) - 1)
        for a in ids:
            acc += w * (maps.co[i, a, target] + s * prior) / (maps.co[i, a, i, a] + s)
            weight += w
    if weight:
        parts.append((acc / weight, 1 - maps.config.token_weight if parts else 1.0))
    if not parts:
        return prior
    return np.clip(sum(p * w for p, w in parts) / sum(w for _, w in parts), 0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_map_predictions_equal_the_naive_reference(seed):
    maps = random_maps(seed)
    rng = np.random.default_rng(seed + 10)
    for trial in range(40):
        token = int(rng.integers(40)) if trial % 3 else None  # some never seen, some unknown
        j = int(rng.integers(0, 4))
        prefix = {i: list(rng.choice(8, 2, replace=False)) for i in range(j)}
        targets = list(range(j, 4))
        got = maps.predict(token, prefix, targets)
        want = np.stack([naive_predict(maps, token, prefix, t) for t in targets])
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert np.allclose(got.sum(-1), 2.0, atol=0.2)  # a per-visit use probability: about K per layer


def test_maps_learn_a_deterministic_routing_and_round_trip(tmp_path):
    """Token 5 always takes experts (j, j+1) at layer j: its map and its trajectory say so."""
    maps = random_maps(0, tokens=50)
    for _ in range(40):
        maps.add_token(5, [[j, j + 1] for j in range(4)])
    by_token = maps.predict(5, {}, [3])[0]
    by_trajectory = maps.predict(None, {0: [0, 1], 1: [1, 2]}, [2])[0]
    assert set(np.argsort(-by_token)[:2]) == {3, 4} and set(np.argsort(-by_trajectory)[:2]) == {2, 3}
    maps.add_request(np.ones(6), np.full((4, 8), 0.25))
    maps.add_request(-np.ones(6), np.full((4, 8), 0.5))
    assert np.allclose(maps.request_prior(np.ones(6) * 3), 0.25 * 0.5 + 0.5 * 0.5)  # two neighbours, both kept
    summary = {"num_experts": 8, "moe_layers": [0, 1, 2, 3], "top_k": 2, "model_hash": "abc"}
    maps.model = summary
    path = maps.save(tmp_path / "m.npz")
    again = ExpertMaps.load(path, summary)
    np.testing.assert_array_equal(again.predict(5, {0: [0, 1]}, [1, 2, 3]), maps.predict(5, {0: [0, 1]}, [1, 2, 3]))
    assert len(again.requests) == 2 and again.tokens_seen == maps.tokens_seen
    with pytest.raises(MapsMismatch, match="model_hash"):
        ExpertMaps.load(path, {**summary, "model_hash": "other"})
    with pytest.raises(FileNotFoundError, match="build_expert_maps"):
        ExpertMaps.load(tmp_path / "none.npz")
    # A damaged file is refused by name (each .npz member carries a CRC32 that reading checks).
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MapsMismatch, match="m.npz: damaged"):
        ExpertMaps.load(path, summary)


def test_maps_stay_bounded():
    maps = random_maps(0, tokens=500, vocab=1000, max_tokens=64, max_requests=3)
    assert len(maps.token_counts) <= 64
    for i in range(10):
        maps.add_request(np.full(4, i + 1.0), np.zeros((4, 8)))
    assert len(maps.requests) == 3
    for _ in range(70000):  # counts saturate by halving, never wrap
        maps.add_token(1, [[0, 1]] * 4)
    assert maps.token_counts[1].max() < 65535 and maps.predict(1, {}, [0])[0][:2].min() > 0.9


def test_reuse_evicts_the_expert_needed_farthest_ahead():
    """Layers run 0, 1, 2, 3, 0, 1, ...: at layer 1, layer 2's expert is looked at next and
    layer 0's three steps later. LRU evicts layer 2's (used longest ago); the reuse rule
    evicts layer 0's."""
    visits = [(0, 2, [0]), (1, 0, [3]), (1, 1, [5])]  # (step, layer, experts); 3 slots full
    victims = {}
    for name in ("lru", "reuse"):
        schedule = Schedule(3, 3, make_policy(name, SHAPE))
        for step, layer, experts in visits:
            schedule.plan_layer(step, layer, experts)
        (plan,) = schedule.plan_layer(1, 1, [5, 6])
        victims[name] = plan.evicted
    assert victims == {"lru": ((2, 0),), "reuse": ((0, 3),)}
    # A prediction that layer 2 needs expert 0 protects it over expert 1.
    policy = make_policy("reuse", SHAPE)
    policy.visit(1, [5])
    policy.observe(2, {0: 0.95, 1: 0.01})
    assert policy.victim([(2, 0), (2, 1)]) == (2, 1)
    assert policy.need_probability((2, 0)) == 0.95


def test_lfru_forgets_old_popularity():
    policy = LFRU(SHAPE, half_life_tokens=1.0)  # a use halves in weight every 4 ticks
    for tick in range(1, 6):
        policy.on_use((0, 1), tick)  # popular long ago
    policy.on_use((0, 2), 40)
    assert policy.victim([(0, 1), (0, 2)]) == (0, 1)


def test_the_cost_model_is_labelled_and_adds_up():
    costs = cost_model("h200-olmoe")
    t = costs.token_ms(layers=16, tokens=10, resumes=20, loads=40)
    parts = sum(v for k, v in t.items() if k != "ms_per_token")
    assert t["ms_per_token"] == pytest.approx(parts) and costs.to_dict()["label"] == "model"
    assert costs.expert_ms() == pytest.approx(12.58e6 / 41e9 * 1e3)
    assert t["resume_ms"] == pytest.approx(2 * costs.resume_ms())
    with pytest.raises(ValueError, match="unknown cost model"):
        cost_model("tpu")


def _driver(policy, prefetch_max=2, costs=CostModel(), amortize=Amortize()):
    schedule = Schedule(10, 4, policy, prefetch_max)
    return DecodeDriver(schedule, [0, 1, 2, 3], 4, DriverConfig(prefetch_max, costs, amortize=amortize))


def test_the_gate_copies_only_what_pays():
    """A near-certain prediction for the next layer is copied; a coin flip is not worth it when
    copies are dear, and is when resumes are."""
    driver = _driver(ReuseAware(SHAPE))
    sure = {1: np.array([0.99, 0.99] + [0.0] * 6)}
    assert driver.choose_prefetch(sure) == [(1, [0, 1])]
    vague = {1: np.full(8, 0.25)}
    dear_copies = CostModel(h2d_gbps=0.5)  # a copy costs 25 ms
    driver = _driver(ReuseAware(SHAPE), costs=dear_copies)
    assert driver.choose_prefetch(vague) == []
    driver = _driver(ReuseAware(SHAPE))
    assert driver.choose_prefetch(sure | {2: np.full(8, 0.25)})[0] == (1, [0, 1])
    driver = _driver(ReuseAware(SHAPE))
    driver.schedule.preload([(1, 0)])  # already cached: nothing to copy for it
    assert driver.choose_prefetch(sure) == [(1, [1])]


def test_amortised_prediction_every_k_tokens_and_below_a_hit_rate():
    driver = _driver(ReuseAware(SHAPE), amortize=Amortize(every=3))
    assert [driver.begin_token(step) for step in range(1, 8)] == [True, False, False, True, False, False, True]
    assert driver.skipped == 4
    driver = _driver(ReuseAware(SHAPE), amortize=Amortize(below=0.5))
    assert not driver.begin_token(1)  # the hit rate starts at 1: nothing to fix
    driver.hit_rate = 0.2
    assert driver.begin_token(2)
    with pytest.raises(ValueError, match="every"):
        Amortize(every=0)


@pytest.mark.parametrize("seed", range(3))
def test_reuse_victims_equal_the_scalar_rule(seed):
    """The vectorised victim is the max of (expected next use, -last use, key) over candidates."""
    rng = np.random.default_rng(seed)
    shape = PolicyShape((0, 2, 3, 5), 8, 2)  # MoE layer ids need not be contiguous
    policy = make_policy("reuse", shape)
    tick = 0
    for _ in range(60):
        layer = int(rng.choice(shape.moe_layers))
        needed = list(rng.choice(8, 2, replace=False))
        policy.visit(layer, needed)
        for e in needed:
            tick += 1
            policy.on_use((layer, int(e)), tick)
        if rng.random() < 0.5:
            policy.observe(int(rng.choice(shape.moe_layers)), {int(e): float(rng.random()) for e in rng.choice(8, 3)})
        candidates = list({(int(rng.choice(shape.moe_layers)), int(rng.integers(8))) for _ in range(6)})
        want = max(candidates, key=lambda k: (policy.expected_next_use(k), -policy.last_use[policy.order[k[0]], k[1]], k))
        assert policy.victim(candidates) == want


def test_the_token_boundary_copies_what_the_next_token_needs():
    """Each token id always takes the same experts: once the maps have seen it, the copies
    made between tokens from the next token's map leave its first layer (which nothing
    inside a token foretells) hitting far more often than without them (the ablation)."""
    rng = np.random.default_rng(0)
    routes = {t: [list(rng.choice(8, 2, replace=False)) for _ in range(4)] for t in range(6)}
    tokens = rng.integers(6, size=300)
    trace = DecodeTrace.single(np.array([routes[int(t)] for t in tokens]), tokens=tokens)
    on, off = (simulate_decode(trace, [0, 1, 2, 3], 4, 10, make_policy("maps", SHAPE, boundary=b), prefetch_max=2,
                               num_experts=8) for b in (True, False))  # fmt: skip
    assert on.boundary_copies > 0 and off.boundary_copies == 0
    assert on.demand_misses < 0.7 * off.demand_misses and on.resumes < 0.7 * off.resumes
    t_on, t_off = on.time(CostModel(), 4), off.time(CostModel(), 4)
    assert t_on["copy_call_ms"] > 0 and t_on["ms_per_token"] < t_off["ms_per_token"]


def test_the_shipped_maps_belong_to_the_shipped_model():
    """checkpoints/jaxmoe-tiny/expert_maps.npz (built by scripts/build_expert_maps.py) loads
    against the model's own summary, stays small, and its token maps predict about K
    experts per layer."""
    from pathlib import Path

    from jaxmoe.config import load_hf_config
    from jaxmoe.offload.expert_maps import MAPS_FILE
    from jaxmoe.predictor.fingerprint import model_summary

    model = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny"
    cfg = load_hf_config(model)
    assert (model / MAPS_FILE).stat().st_size < 400_000  # it travels with every checkout
    maps = ExpertMaps.load(model / MAPS_FILE, model_summary(cfg))
    assert (maps.lm, maps.e, maps.k) == (len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)
    assert maps.tokens_seen > 10_000 and maps.requests and maps.requests[0][0].dtype == np.float32
    token = max(maps.token_visits, key=maps.token_visits.get)
    p = maps.predict(token, {}, list(range(maps.lm)))
    assert np.allclose(p.sum(-1), cfg.top_k, atol=0.3) and p.max() > 0.5


def test_the_device_reuse_rule_is_the_host_rule():
    """The reuse rule the decode step runs (device_cache: estimates as device arrays, updated as
    `ensure` visits a layer) against offload/reuse.py's: the same estimates and errors after the
    same visits, and each cached expert's expected wait equal to expected_next_use, with and
    without a prediction for the next layer."""
    import jax.numpy as jnp

    from jaxmoe.offload import device_cache as dc

    rng = np.random.default_rng(0)
    shape = PolicyShape((0, 2, 3, 5), 8, 2)  # MoE layer ids need not be contiguous
    layers, slots = 6, 10
    host = make_policy("reuse", shape)
    device = dc.DevicePolicy.of(host, shape.moe_layers)
    state = dc.new_state(None, {}, slots, layers, 8, reuse=host.device_arrays(layers))
    for _ in range(25):
        for layer in shape.moe_layers:
            ids = rng.choice(8, 2, replace=False)
            host.visit(layer, [int(e) for e in ids])
            state, _ = dc.ensure(state, None, device, layer, jnp.asarray(ids[None], jnp.int32), jnp.ones(1, bool), 2)
    np.testing.assert_allclose(np.asarray(state.reuse.estimates)[:, list(shape.moe_layers)], host.estimates, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.reuse.errors), host.errors, rtol=1e-4, atol=1e-6)
    keys = [(int(k) // 8, int(k) % 8) for k in np.asarray(state.slot_key) if k >= 0]
    owner, e = jnp.asarray([k[0] for k in keys]), jnp.asarray([k[1] for k in keys])
    host.visit(2, [])  # the layer being planned (waits count from it); the device starts from the host's estimates
    state = state._replace(reuse=host.device_arrays(layers))
    wait = dc.expected_wait(state, device, owner, e, 2, None)
    np.testing.assert_allclose(np.asarray(wait), [host.expected_next_use(k) for k in keys], rtol=1e-5)
    probs = np.where(rng.random(8) < 0.5, rng.random(8), 0.0)  # the device keeps the likeliest few
    host.observe(3, {e: q for e, q in enumerate(probs) if q > 0})
    state = state._replace(predicted=state.predicted.at[3].set(jnp.asarray(probs, jnp.float32)))
    wait = dc.expected_wait(state, device, owner, e, 2, 3)
    np.testing.assert_allclose(np.asarray(wait), [host.expected_next_use(k) for k in keys], rtol=1e-5)
    assert any(k[0] == 3 for k in keys)  # the prediction mattered to some cached expert
