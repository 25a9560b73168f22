"""Offloaded prefill, streamed or routed, chunked or not, computes what the resident
model computes; the stream plan keeps at most two layers of streamed experts; the
decode cache keeps each layer's most used experts; compiled programs persist."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.inputs import pad_prompts
from jaxmoe.model import init_kv_cache
from jaxmoe.offload.cache import batch_minimum_experts
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import GateAhead
from jaxmoe.offload.prefill_plan import choose_mode, plan_stream, routed_slot_crossover

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
rng = np.random.default_rng(7)
LONG = [rng.integers(0, 32, n).tolist() for n in (40, 7, 33, 64)]  # bucket 64: four chunks of 16


@functools.cache
def setup(family: str):
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model(family, "wide"), "float32")
    return cfg, model, experts, HostExpertStore.from_stacks(cfg, experts)


@functools.cache
def resident_tokens(family: str, batch: int, new: int) -> list:
    cfg, model, experts, _ = setup(family)
    return ResidentEngine(cfg, model, experts, prefill_chunk=CHUNK).generate(LONG[:batch], new).token_ids


def engine(family: str, experts_in_budget: int | None = None, policy: str = "lru", **kw) -> OffloadedEngine:
    """Default budget: a little over the minimum working set of a batch of four, short of all experts."""
    cfg, model, _, store = setup(family)
    if experts_in_budget is None:
        experts_in_budget = batch_minimum_experts(4, store.format, cfg) + 3
        assert experts_in_budget < len(store.keys())
    kw = {"prefill_chunk": CHUNK, **kw}
    budget = experts_in_budget * store.expert_bytes
    return OffloadedEngine(cfg, model, store, budget, policy, check_budget=True, **kw)


def whole_prompt_logits(family: str, prompts) -> np.ndarray:
    """The reference: the resident model over each whole prompt at once, no chunks."""
    cfg, model, experts, _ = setup(family)
    lengths, tokens, cache_len = pad_prompts(cfg, prompts, 1)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    h, _, _ = model(jnp.asarray(tokens), positions, init_kv_cache(cfg, len(prompts), cache_len), experts)
    return np.asarray(model.logits(h[np.arange(len(prompts)), lengths - 1]))


def prefill_logits(eng: OffloadedEngine, family: str, prompts) -> np.ndarray:
    cfg = eng.config
    lengths, tokens, cache_len = pad_prompts(cfg, prompts, 1)
    eng.ensure_cache(len(prompts))
    x, _ = eng.prefill(tokens, lengths, list(init_kv_cache(cfg, len(prompts), cache_len)))
    _, model, _, _ = setup(family)
    return np.asarray(model.logits(model.norm(x)[np.arange(len(prompts)), lengths - 1]))


# Each mode on one family by default (a different one each), the rest with --slow.
FAST_CHUNKED = {("stream", "olmoe"), ("routed", "qwen2_moe"), ("injit", "qwen3_moe")}
CHUNKED = [pytest.param(m, f, marks=() if (m, f) in FAST_CHUNKED else pytest.mark.slow, id=f"{m}-{f}")
           for f in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe") for m in ("stream", "routed", "injit")]  # fmt: skip


@pytest.mark.parametrize("mode,family", CHUNKED)
def test_chunked_prefill_matches_the_whole_prompt_and_the_resident_tokens(family, mode):
    eng = engine(family, prefill=mode)
    logits, reference = prefill_logits(eng, family, LONG), whole_prompt_logits(family, LONG)
    np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-4)
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    assert eng.prefill_plan.mode == mode and eng.prefill_plan.chunks == 4

    eng.reset_cache()
    result = eng.generate(LONG, 6)
    assert result.token_ids == resident_tokens(family, 4, 6)
    m = result.metrics
    assert m["prefill_mode"] == mode and m["prefill_h2d_bytes"] > 0
    if mode != "routed":
        moe = sum(eng.config.moe_layers)
        assert m["prefill_h2d_bytes"] == moe * eng.config.num_experts * eng.store.expert_bytes  # once per layer
        assert m["prefill_max_streamed_layers"] == 2
    if mode == "stream":
        assert 0 <= m["prefill_overlap"] <= 1


@pytest.mark.parametrize("batch,overlap", [(1, True), (4, False)])
def test_stream_with_and_without_overlap_matches_resident(batch, overlap):
    eng = engine("olmoe", prefill="stream", prefill_overlap=overlap)
    result = eng.generate(LONG[:batch], 6)
    assert result.token_ids == resident_tokens("olmoe", batch, 6)
    assert result.metrics["prefill_max_streamed_layers"] == (2 if overlap else 1)


@pytest.mark.parametrize("policy", ["ondemand", "lfu", "predictor"])
def test_stream_then_decode_with_every_policy_matches_resident(policy):
    model = setup("olmoe")[1]
    predictor = GateAhead(model) if policy == "predictor" else None
    eng = engine("olmoe", None, policy, prefill="stream", predictor=predictor)
    result = eng.generate(LONG[:1], 6)
    assert result.token_ids == resident_tokens("olmoe", 1, 6)
    assert result.metrics["prefill_mode"] == "stream"
    retained = [p for p in eng.plan if p.kind == "retain" and p.experts]
    assert (policy == "ondemand") == (not retained)  # ondemand keeps nothing for decode


def test_short_prompts_load_only_routed_experts_and_match():
    cfg, model, experts, _ = setup("olmoe")
    prompts = [[5, 7, 9], [30, 1]]
    eng = engine("olmoe")
    result = eng.generate(prompts, 6)
    assert result.metrics["prefill_mode"] == "routed"
    assert result.token_ids == ResidentEngine(cfg, model, experts).generate(prompts, 6).token_ids
    # 2 prompts x at most 3 tokens x top-4 route to at most 24 of the 3 x 16 experts.
    assert result.metrics["prefill_h2d_bytes"] <= 24 * 3 * eng.store.expert_bytes


def test_second_prefill_sends_only_what_the_cache_lacks():
    eng = engine("olmoe", prefill="stream")
    first = eng.generate(LONG, 1)
    cached = len(eng.cache.schedule.slot_of)
    second = eng.generate(LONG, 1)
    total = sum(eng.config.moe_layers) * eng.config.num_experts
    assert cached > 0
    assert second.metrics["prefill_h2d_bytes"] == (total - cached) * eng.store.expert_bytes
    assert first.token_ids == second.token_ids


def test_prefill_leaves_each_layers_most_used_experts_cached():
    cfg, model, experts, _ = setup("olmoe")
    eng = engine("olmoe", prefill="stream")
    eng.generate(LONG, 1)
    lengths, tokens, cache_len = pad_prompts(cfg, LONG, 1)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, _, routings = model(jnp.asarray(tokens), positions, init_kv_cache(cfg, len(LONG), cache_len), experts)
    valid = (np.arange(tokens.shape[1])[None] < lengths[:, None]).reshape(-1)
    quotas = eng.cache.schedule.retain_quotas([layer for layer in range(cfg.num_layers) if cfg.moe_layers[layer]])
    for layer, routing in enumerate(routings):
        counts = np.bincount(np.asarray(routing.ids)[valid].ravel(), minlength=cfg.num_experts)
        top = sorted(range(cfg.num_experts), key=lambda e: (-counts[e], e))[: quotas[layer]]
        held = {e for (l_, e) in eng.cache.schedule.slot_of if l_ == layer}
        assert held == set(top), layer
    assert sum(quotas.values()) == eng.cache.num_slots
    assert [p.kind for p in eng.plan].count("retain") == sum(cfg.moe_layers)


def _assert_stacked_alone(plan, moe_layers):
    """Each layer is stacked once, after its copies and before it computes, while no other
    layer's experts are on the device (copies and stack hold it twice then)."""
    ops, live = [(s.op, s.layer) for s in plan.steps], plan.streamed_layers_over_time()
    for layer in moe_layers:
        at = ops.index(("stack", layer))
        assert ops.count(("stack", layer)) == 1 and live[at] == 1
        assert ops.index(("copy", layer)) < at < ops.index(("compute", layer))


def test_stream_plan_double_buffer_and_order():
    moe = [True, False, True, True, True]
    cached = {2: {0, 5}}
    plan = plan_stream(range(5), moe, 8, cached, chunk=16, chunks=2, lookahead=1)
    assert plan.max_streamed_layers == 2
    ops = [(s.op, s.layer) for s in plan.steps]
    moe_layers = [layer for layer in range(5) if moe[layer]]
    for i, layer in enumerate(moe_layers):
        assert ops.index(("copy", layer)) < ops.index(("compute", layer))
        if i + 1 < len(moe_layers):  # the next layer's copies go out before this layer computes
            assert ops.index(("copy", moe_layers[i + 1])) < ops.index(("compute", layer))
    copy2 = next(s for s in plan.steps if s.op == "copy" and s.layer == 2)
    assert copy2.cached == (0, 5) and set(copy2.sent) == set(range(8)) - {0, 5}
    _assert_stacked_alone(plan, moe_layers)
    assert plan.sent_experts == 4 * 8 - 2
    in_jit = plan_stream(range(5), moe, 8, cached, chunk=16, chunks=2, in_jit=True)
    ops = [(s.op, s.layer, s.in_jit) for s in in_jit.steps]
    assert in_jit.max_streamed_layers == 2 and ops[0] == ("copy", 0, False)
    for i, layer in enumerate(moe_layers[:-1]):  # the next layer's copy is in this layer's program
        assert ops[ops.index(("compute", layer, False)) - 1] == ("copy", moe_layers[i + 1], True)
    _assert_stacked_alone(in_jit, moe_layers)
    serial = plan_stream(range(5), moe, 8, cached, chunk=16, chunks=2, lookahead=0)
    assert serial.max_streamed_layers == 1
    _assert_stacked_alone(serial, moe_layers)
    with pytest.raises(ValueError, match="lookahead"):
        plan_stream(range(5), moe, 8, cached, 16, 2, lookahead=2)
    with pytest.raises(ValueError, match="lookahead"):
        plan_stream(range(5), moe, 8, cached, 16, 2, lookahead=0, in_jit=True)


def test_choose_mode():
    crossover = routed_slot_crossover(64)
    assert crossover == int(64 * np.log(64))
    assert choose_mode("auto", 64, crossover - 1, 1, all_cached=False) == "routed"
    assert choose_mode("auto", 64, crossover, 1, all_cached=False) == "stream"
    assert choose_mode("auto", 64, 8, 2, all_cached=False) == "stream"  # a chunked prompt streams
    assert choose_mode("auto", 64, 10_000, 4, all_cached=True) == "routed"  # nothing to move
    assert choose_mode("stream", 64, 8, 1, all_cached=True) == "stream"
    with pytest.raises(ValueError, match="prefill mode"):
        choose_mode("fast", 64, 8, 1, False)
    with pytest.raises(ValueError, match="prefill"):
        engine("olmoe", prefill="fast")
    with pytest.raises(ValueError, match="power of two"):
        engine("olmoe", prefill_chunk=24)


def test_chunk_programs_memory_does_not_grow_with_the_prompt():
    """Activation memory is bounded by the chunk: with the same KV cache length, the
    per-(layer, chunk) program's scratch is the same for a 64- and a 128-token prompt."""
    cfg = setup("olmoe")[0]
    scratch = {}
    for n in (60, 120):
        eng = engine("olmoe", prefill="stream")
        lengths, tokens, cache_len = pad_prompts(cfg, [rng.integers(0, 32, n).tolist()], 100)
        assert cache_len == 256
        eng.ensure_cache(1)
        eng.prefill(tokens, lengths, list(init_kv_cache(cfg, 1, cache_len)))
        programs = eng.executor.compiled("moe_chunk")
        assert len(programs) == 1  # one program for every chunk of every layer
        scratch[n] = programs[0].memory_analysis().temp_size_in_bytes
    assert scratch[120] == scratch[60]


@pytest.mark.e2e
def test_compiled_programs_are_reused_by_a_second_process(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("olmoe", "wide")
    ckpt = tmp_path / "ckpt"
    run = [sys.executable, str(REPO / "scripts" / "convert_hf.py"), str(src), str(ckpt)]
    assert subprocess.run(run, capture_output=True, cwd=REPO).returncode == 0
    args = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(ckpt), "--json",
            "--prompt-ids", " ".join(map(str, LONG[0])), "--max-new-tokens", "4", "--prefill", "stream",
            "--prefill-chunk", "16", "--expert-budget-gb", str(20 * 12288 / 1e9),
            "--compilation-cache", str(tmp_path / "xla"), "--plan"]  # fmt: skip
    first, second = (subprocess.run(args, capture_output=True, text=True, cwd=REPO) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["outputs"] == b["outputs"]
    assert a["metrics"]["compile_cache_hits"] == 0 and b["metrics"]["compile_cache_hits"] > 0
    assert b["prefill_plan"]["mode"] == "stream" and b["prefill_plan"]["max_streamed_layers"] == 2
    assert any(p["kind"] == "retain" for p in b["plan"])


def test_prepare_compiles_the_streamed_prefill_ahead_of_time():
    eng = engine("olmoe", prefill="stream")
    plan = eng.prepare(batch=4, prompt_tokens=64, max_new_tokens=1)
    assert plan.mode == "stream" and plan.chunks == 4 and plan.sent_experts == 3 * 16
    compiled = len(eng.programs)
    result = eng.generate(LONG, 1)  # 64-token bucket, one token: prefill and first token only
    assert len(eng.programs) == compiled  # nothing compiled on the way
    assert result.token_ids == [t[:1] for t in resident_tokens("olmoe", 4, 6)]


@pytest.mark.parametrize("prefill,policy,batch", [("routed", "lru", 4), ("injit", "predictor", 1)])
def test_prepare_compiles_every_program_a_generate_runs(prefill, policy, batch):
    """Prefill in its mode, the first token, the decode layers and head, the cache's own
    programs: after prepare, generating in that bucket compiles nothing."""
    cfg, model, _, store = setup("olmoe")
    kw = {"predictor": GateAhead(model)} if policy == "predictor" else {}
    experts = batch_minimum_experts(batch, store.format, cfg) + 3
    eng = engine("olmoe", experts, policy=policy, prefill=prefill, **kw)
    eng.prepare(batch=batch, prompt_tokens=64, max_new_tokens=6)
    compiled = len(eng.programs)
    result = eng.generate(LONG[:batch], 6)
    assert len(eng.programs) == compiled  # nothing compiled on the way
    assert result.token_ids == resident_tokens("olmoe", batch, 6)
