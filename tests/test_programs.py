"""Compiled programs carry their own names and the model's phases their own scopes,
so a profile says what ran (jit_attend_route/attention/..., not jit__lambda_)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.runtime.programs import program_name
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.engine.step import decode_step
from jaxmoe.model import MoEDecoder, init_experts, init_kv_cache, layer_slot, moe_ffn
from jaxmoe.offload.cache import minimum_experts
from jaxmoe.offload.host_store import HostExpertStore

# Qwen2-MoE has every phase: a dense layer (mlp), then a MoE layer with a shared expert.
CFG = MoEConfig(
    family="qwen2_moe", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    num_experts=4, top_k=2, expert_intermediate_size=8, moe_layers=(False, True), shared_expert_intermediate_size=8,
    dense_intermediate_size=16, dtype="float32",
)  # fmt: skip


@functools.cache
def tiny():
    return MoEDecoder(CFG, nnx.Rngs(0)), init_experts(CFG, jax.random.key(1))


def module_names(programs) -> dict[str, str]:
    """Program name -> the HLO module name of its compiled program."""
    return {program_name(key[0]): c.as_text().split(",", 1)[0].removeprefix("HloModule ")
            for key, c in programs._compiled.items()}  # fmt: skip


def test_every_compiled_program_is_named_after_its_program():
    model, experts = tiny()
    store = HostExpertStore.from_stacks(CFG, experts)
    engines = [ResidentEngine(CFG, model, experts)]
    engines[0].generate([[1, 2, 3]], 2)
    # Every expert and the gather (a routed prefill, nothing copied), then the minimum (a cache
    # of two slots: the prefill streams, copies go through the cache's own programs).
    for experts_in_budget in (minimum_experts(CFG.top_k, 0) + 2, minimum_experts(CFG.top_k, 0)):  # batch 1: no gather
        budget = experts_in_budget * store.expert_bytes
        engines.append(OffloadedEngine(CFG, model, store, budget))
        engines[-1].generate([[1, 2, 3]], 2)  # the prefill and a decode step (misses in the program)
        engines.append(OffloadedEngine(CFG, model, store, budget, "maps"))
        engines[-1].generate([[1, 2, 3]], 2)  # a host-planned decode step
        engines.append(OffloadedEngine(CFG, model, store, budget, prefill="stream"))
        engines[-1].prepare(1, 3, 2)  # the streamed prefill's chunk programs and the cache's own
    names = {k: v for engine in engines for k, v in module_names(engine.programs).items()}
    expected = {"embed", "dense", "attend_route", "experts", "first_token", "device_step", "step", "dense_chunk", "moe_chunk",
                "take_from_pool", "stack_experts", "prefill_chunk", "decode", "fetch_rows", "fetch_into_pool",
                "write_rows"}  # fmt: skip
    assert set(names) == expected
    for name, module in names.items():
        assert module == f"jit_{name}" and "lambda" not in module


def test_model_phases_are_named_scopes_in_the_lowered_program():
    model, experts = tiny()
    kv = init_kv_cache(CFG, 1, 8)
    x, positions = jnp.zeros((1, 2, CFG.hidden_size)), jnp.zeros((1, 2), jnp.int32)

    def scopes(fn, *args) -> set[str]:
        text = jax.jit(fn).lower(*args).as_text(debug_info=True)
        return set(re.findall(r'loc\("jit\(\w+\)/(\w+)/', text))

    def dense_layer(x, kv):
        return model.layers[0](x, positions, kv, None, moe_ffn)

    def moe_layer(x, kv, w):
        return model.layers[1](x, positions, kv, w, moe_ffn)

    assert {"attention", "mlp"} <= scopes(dense_layer, x, layer_slot(kv, CFG, 0))
    assert {"attention", "router", "experts", "combine", "shared_expert"} <= scopes(moe_layer, x, layer_slot(kv, CFG, 1),
                                                                                    experts[1])  # fmt: skip
    assert "head" in scopes(model.logits, x[:, 0])


# Batch 1 routes 2 rows to 4 experts, so the step gathers the distinct ones; batch 3 routes
# 6, so every expert is used in place. Both paths place the rows with a search.
@pytest.mark.parametrize("b", [1, 3])
def test_the_decode_step_has_no_loop(b):
    """XLA on a GPU reads a while loop's predicate back to the host at every iteration, so a
    loop in the decode step stalls the host on the device (the H100 profile of the step
    found four per MoE layer, from a binary search). The lowered program, not the compiled
    one, since XLA on a CPU unrolls short loops."""
    model, experts = tiny()
    kv = init_kv_cache(CFG, b, 8)

    def step(tokens, positions, kv):
        return decode_step(model, tokens, positions, jnp.ones((b,), bool), kv, experts, None, jnp.int32(0),
                           jnp.zeros((b, 1, CFG.hidden_size)), jax.random.key(0), jnp.int32(0),
                           sampling=SamplingParams())  # fmt: skip

    tokens = jnp.ones((b, 1), jnp.int32)
    text = jax.jit(step).lower(tokens, tokens, kv).as_text()
    assert "stablehlo.while" not in text


def test_the_kv_cache_is_one_stack_whatever_the_layers_and_each_layer_writes_its_own_entry():
    """A program takes the cache as a few arrays (a call costs host time per argument), and
    each layer writes its rows' keys at their positions in its own entry of the stack."""
    import dataclasses

    import numpy as np

    cfg = dataclasses.replace(CFG, num_layers=6, moe_layers=(False,) + (True,) * 5)
    kv = init_kv_cache(cfg, 2, 8)
    assert len(jax.tree.leaves(kv)) == 2 and kv[0].k.shape == (6, 2, 8, 2, 8)
    model, experts = MoEDecoder(cfg, nnx.Rngs(0)), init_experts(cfg, jax.random.key(1))
    _, new, _ = model(jnp.array([[3], [7]]), jnp.array([[3], [5]]), kv, experts)
    keys = np.asarray(new[0].k)  # [L, B, S, Hk, Dh]
    written = np.abs(keys).sum(axis=(3, 4)) > 0
    want = np.zeros((6, 2, 8), bool)
    want[:, 0, 3] = want[:, 1, 5] = True
    assert (written == want).all()
    assert not np.allclose(keys[0], keys[1])  # each layer its own keys
