"""DeepSeek-V2/V3 against transformers: multi-head latent attention with and without a
low-rank query, YaRN, dense first layers, shared experts, V2's greedy and group-limited
softmax routers and V3's sigmoid router with its correction bias and groups; through
convert_hf.py + generate.py, resident and offloaded."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import DEEPSEEK_VARIANTS, tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.config import ConfigError, from_hf_dict
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model import LatentKV, init_kv_cache, route
from jaxmoe.offload.cache import batch_minimum_experts
from jaxmoe.offload.host_store import HostExpertStore, total_expert_bytes
from test_cli import hf_greedy, script

CASES = [(f, v) for f, vs in DEEPSEEK_VARIANTS.items() for v in vs]
TOKENS = np.random.RandomState(0).randint(0, 32, (2, 11))
PROMPTS = [[5, 7, 9], list(range(3, 19)), [4, 0, 12, 31, 8] * 4]


@functools.cache
def pair(family: str, variant: str):
    hf = tiny_hf_model(family, variant)
    return hf, jaxmoe_from_hf(hf)


@pytest.mark.parametrize("family,variant", CASES)
def test_logits_and_routing_match_transformers(family, variant):
    hf, (cfg, model, experts) = pair(family, variant)
    b, t = TOKENS.shape
    with torch.no_grad():
        want = hf(torch.tensor(TOKENS)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    kv = init_kv_cache(cfg, b, 32)
    assert all(isinstance(layer, LatentKV) for layer in kv)  # the cache holds latents, not keys and values
    h, _, _ = model(jnp.asarray(TOKENS), positions, kv, experts)
    np.testing.assert_allclose(np.asarray(model.logits(h)), want, atol=1e-4, rtol=0)

    # Each router on the same random inputs: the same experts with the same weights.
    x = np.random.RandomState(1).normal(size=(64, cfg.hidden_size)).astype(np.float32)
    for layer in cfg.moe_layer_ids:
        with torch.no_grad():
            _, w_ref, ids_ref = hf.model.layers[layer].mlp.gate(torch.tensor(x))
        routing = model.layers[layer].mlp.route(jnp.asarray(x))
        order = np.argsort(ids_ref.numpy(), axis=-1)  # transformers leaves its top-k unsorted
        ids, w = np.asarray(routing.ids), np.asarray(routing.weights)
        mine = np.argsort(ids, axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(ids, mine, -1), np.take_along_axis(ids_ref.numpy(), order, -1))
        np.testing.assert_allclose(np.take_along_axis(w, mine, -1), np.take_along_axis(w_ref.numpy(), order, -1),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_group_limits_change_the_choice():
    """The grouped tiny models choose differently with their groups lifted: the groups are tested."""
    for family in DEEPSEEK_VARIANTS:
        _, (cfg, model, _) = pair(family, "base" if family == "deepseek_v3" else "group_limited")
        x = jnp.asarray(np.random.RandomState(1).normal(size=(64, cfg.hidden_size)).astype(np.float32))
        gate = model.layers[cfg.moe_layer_ids[0]].mlp
        free = cfg.replace(router_groups=1, router_topk_groups=1)
        bias = gate.e_score_correction_bias[...] if cfg.router_correction_bias else None
        assert not np.array_equal(np.asarray(route(free, gate.gate(x), bias).ids), np.asarray(gate.route(x).ids))


@pytest.mark.parametrize("family,variant", [("deepseek_v3", "base"),
                                            *(pytest.param(*c, marks=pytest.mark.slow) for c in CASES
                                              if c != ("deepseek_v3", "base"))])  # fmt: skip
def test_convert_then_generate_matches_transformers(hf_checkpoint, tmp_path, family, variant):
    model, src = hf_checkpoint(family, variant)
    dst = tmp_path / "ckpt"
    assert script("convert_hf.py", str(src), str(dst)).returncode == 0
    prompts = [[3, 14, 15, 9, 26, 5], [27, 18, 28]]
    args = ["--model", str(dst), "--max-new-tokens", "20", "--json"]
    for p in prompts:
        args += ["--prompt-ids", " ".join(map(str, p))]
    proc = script("generate.py", *args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [o["token_ids"] for o in report["outputs"]] == [hf_greedy(model, p, 20) for p in prompts]


@functools.cache
def wide(family: str):
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model(family, "wide"))
    return cfg, model, experts, HostExpertStore.from_stacks(cfg, experts)


@functools.cache
def resident_tokens(family: str, batch: int, new: int):
    cfg, model, experts, _ = wide(family)
    return ResidentEngine(cfg, model, experts).generate(PROMPTS[:batch], new).token_ids


def budget_experts(family: str, batch: int, budget: str) -> int:
    cfg, *_, store = wide(family)
    least = batch_minimum_experts(batch, store.format, cfg)
    return least if budget == "min" else max(least, len(store.keys()) // 2)


# Default run: V3 at the minimum with batch 3; every other family, batch, budget and policy with --slow.
FAST = {("deepseek_v3", 3, "min", "lru")}
OFFLOAD = [pytest.param(f, b, n, p, marks=() if (f, b, n, p) in FAST else pytest.mark.slow, id=f"{f}-b{b}-{n}-{p}")
           for f in DEEPSEEK_VARIANTS for b in (1, 3) for n in ("min", "half") for p in ("lru", "lfu", "ondemand")]  # fmt: skip


@pytest.mark.parametrize("family,batch,budget,policy", OFFLOAD)
def test_offloaded_matches_resident(family, batch, budget, policy):
    cfg, model, _, store = wide(family)
    n = budget_experts(family, batch, budget)
    assert n < len(store.keys())
    engine = OffloadedEngine(cfg, model, store, n * store.expert_bytes, policy, check_budget=True)
    result = engine.generate(PROMPTS[:batch], 16)
    assert result.token_ids == resident_tokens(family, batch, 16)
    assert result.metrics["expert_misses"] > 0


def test_the_latent_cache_is_what_mla_saves():
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim numbers."""
    cfg, *_ = wide("deepseek_v3")
    kv = jax.eval_shape(lambda: init_kv_cache(cfg, 2, 8))
    per_token = sum(np.prod(a.shape) for a in jax.tree.leaves(kv)) // (2 * 8 * cfg.num_layers)
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 2, "num_key_value_heads=2"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("topk_method", "noaux_tc", "topk_method"),
    ("n_group", 3, "n_group=3"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type"),
])  # fmt: skip
def test_unsupported_options_name_their_field(field, value, match):
    hf, _ = pair("deepseek_v2", "group_limited")
    with pytest.raises(ConfigError, match=match):
        from_hf_dict({**hf.config.to_dict(), field: value})


@pytest.mark.parametrize("offload", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_server_rows_equal_offline(offload):
    """The server's batch cache holds MLA's latent caches: concurrent requests (token-id prompts)
    get what the engine computes for each alone."""
    import concurrent.futures as cf

    pytest.importorskip("uvicorn")
    from serve_helpers import ServerThread

    cfg, model, experts, store = wide("deepseek_v3")
    engine = ResidentEngine(cfg, model, experts, prefill_chunk=16)
    want = [engine.generate([p], 10).token_ids[0] for p in PROMPTS]
    if offload:  # half the experts: room for two rows
        engine = OffloadedEngine(cfg, model, store, budget_experts("deepseek_v3", 2, "half") * store.expert_bytes,
                                 "lru", prefill_chunk=16)  # fmt: skip
    with ServerThread(engine, {}, None, model_path="deepseek", max_batch=2 if offload else 4) as server:
        client = server.client()

        def complete(prompt):
            r = client.completions.create(model="deepseek", prompt=prompt, max_tokens=10, temperature=0)
            return r.choices[0].model_extra["token_ids"]

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, PROMPTS)) == want


def test_export_loads_in_transformers_with_the_same_weights(hf_checkpoint, tmp_path):
    """convert -> export_hf: save_pretrained's tensor names, and transformers computes the
    original model's logits from the exported directory."""
    import transformers
    from safetensors import safe_open

    from jaxmoe.checkpoint import convert_hf
    from jaxmoe.checkpoint.export import export_hf

    model, src = hf_checkpoint("deepseek_v3", "base")
    export_hf(convert_hf(src, tmp_path / "ckpt", progress=False), tmp_path / "hf")
    keys = [set(safe_open(d / "model.safetensors", "np").keys()) for d in (src, tmp_path / "hf")]
    assert keys[0] == keys[1]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():  # from_pretrained picks sdpa attention where the reference runs eager
        got, want = (m(torch.tensor(TOKENS)).logits.numpy() for m in (again, model))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("prefill", ["stream", "routed", "injit"])
@pytest.mark.parametrize("fmt", ["dense", "int4"])
def test_prefill_modes_and_quantized_experts_match_resident(hf_checkpoint, tmp_path, prefill, fmt):
    """Every prefill mode, chunked (a 24-token prompt in chunks of 16), on dense and int4
    experts: offloaded tokens equal the same checkpoint's resident ones."""
    from jaxmoe.checkpoint import convert_hf, load
    from jaxmoe.quant import DENSE, ExpertFormat

    _, src = hf_checkpoint("deepseek_v2", "wide")
    quant = DENSE if fmt == "dense" else ExpertFormat("int4", 16)
    path = convert_hf(src, tmp_path / "ckpt", progress=False, fmt=quant)
    prompts = [list(range(1, 25)), [5, 7, 9]]
    loaded = load(path)
    want = ResidentEngine(loaded.config, loaded.model, loaded.experts, prefill_chunk=16).generate(prompts, 12).token_ids
    # Three quarters of the experts (the int4 gather is widened, so half is below its minimum).
    budget = 3 * total_expert_bytes(loaded.config, quant) // 4
    engine = OffloadedEngine.from_checkpoint(path, budget, "lru", prefill=prefill, prefill_chunk=16)
    assert engine.generate(prompts, 12).token_ids == want


def test_multi_token_prediction_layers_are_not_read(hf_checkpoint, tmp_path):
    """A V3 checkpoint's layer past num_hidden_layers (its MTP module) converts to the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxmoe.checkpoint import convert_hf, load

    _, src = hf_checkpoint("deepseek_v3", "base")
    hf = shutil.copytree(src, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.2.enorm.weight"] = np.ones(64, np.float32)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    loaded = load(convert_hf(hf, tmp_path / "ckpt", progress=False))
    assert len(loaded.model.layers) == 2
