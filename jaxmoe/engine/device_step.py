"""One decode step as one program that never waits on the host: misses are fetched inside it.

Embedding, every layer, the final norm, the head and sampling run in one compiled program,
as in engine/step.py, with the expert cache's state (jaxmoe/offload/device_cache.py)
threaded through it. Each MoE layer attends and routes, predicts the next MoE layer's
experts (with a scorer), brings its own missing experts from pinned host memory into
the pool (`ensure`), computes with the pool's rows, and then copies
the predicted experts of the next layer that are absent (`prefetch`), so those copies
can run while the next layer attends. The expert contraction is the resident engine's
call with the same shapes (each (row, k) pair's expert read where it lies: model/experts.py's
`expert_pairs`), so the tokens are the resident ones whatever was cached. The one exception is opt-in: with the policy's
`skip_below` W > 0 a missed expert whose routing weight is below W is neither fetched nor
computed (`drop_experts` zeroes its weight), and the tokens are approximate.

Shapes: B batch, D hidden, L layers, E experts, K experts per token, S pool slots.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.engine.step import head_token
from jaxmoe.model import LayerCache, MoEDecoder, layer_slot, moe_ffn, num_unique_experts, with_slot
from jaxmoe.model.experts import drop_experts
from jaxmoe.offload import device_cache as dc
from jaxmoe.offload.policy import next_moe_layers
from jaxmoe.quant import ExpertFormat, packed_experts


class DeviceStepOut(NamedTuple):
    token: jax.Array  # [B] int32 sampled from the last position
    kv: tuple[LayerCache, ...]
    state: dc.CacheState
    positions: jax.Array  # [B] the next step's positions
    step: jax.Array  # [] the next step


def skip_missed(cfg, rows: jax.Array, weights: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The approximate decode's (row, k) that `ensure` skipped (a valid row's slot -1 in `rows`
    [B, K]) at weight exactly 0 (`drop_experts`: the others renormalised where the family does),
    computed with the slot of their row's first choice (never skipped: no extra expert is
    gathered, and its output is finite, so 0 x output is 0, where an arbitrary slot's bytes
    might hold a NaN). Returns (rows, weights)."""
    skipped = valid[:, None] & (rows < 0)  # [B, K]
    return jnp.where(skipped, rows[:, :1], rows), drop_experts(cfg, weights, skipped)


def device_step(
    model: MoEDecoder,
    tok: jax.Array,  # [B] int32
    positions: jax.Array,  # [B] int32
    valid: jax.Array,  # [B] bool: rows whose experts count (padding and finished rows load nothing)
    kv: Sequence[LayerCache],  # the cache's stacks (model/kv.py)
    state: dc.CacheState,
    hosts: Sequence[jax.Array | None],  # per layer: its experts [E, bytes] in pinned host memory
    root: jax.Array,  # PRNG key
    step: jax.Array,  # [] int32: the token step (sampling key)
    scorer_leaves: tuple = (),
    *,
    sampling: SamplingParams,
    policy: dc.DevicePolicy,
    fmt: ExpertFormat,
    scorer=None,
    moe_fn: Callable = moe_ffn,
    sampler: Callable | None = None,
    merge: Callable | None = None,
) -> DeviceStepOut:
    """`sampler`: as engine/step.py's `head_token` takes it (the server). `merge`: as
    `forward_step` takes it, each layer's weights viewed after its input."""
    cfg = model.cfg
    b = tok.shape[0]
    unique = num_unique_experts(cfg.num_experts, b, cfg.top_k)
    following = next_moe_layers(cfg.moe_layer_ids)
    x = model.embed_tokens(tok[:, None])  # [B, 1, D]
    pos = positions[:, None]
    state, predict_now = dc.begin_token(state, policy, step, scorer is not None)
    for layer in range(cfg.num_layers):
        module = (merge(x) if merge else model).layers[layer]
        if not module.is_moe:
            x, slot, _ = module(x, pos, layer_slot(kv, cfg, layer), None, moe_fn)
            kv = with_slot(kv, cfg, layer, slot)
            continue
        x_att, slot, h, routing = module.attend_and_route(x, pos, layer_slot(kv, cfg, layer))
        kv = with_slot(kv, cfg, layer, slot)
        nxt = following[layer] if scorer is not None else None

        def scores(h=h, layer=layer):  # the next layer's probabilities [B, E]
            return jax.nn.softmax(scorer.score(scorer_leaves, h, jnp.int32(layer)).astype(jnp.float32), axis=-1)

        with jax.named_scope("fetch"):
            state, rows = dc.visit(state, hosts[layer], policy, layer, nxt, routing.ids, valid, unique, predict_now,
                                   scores if nxt is not None else None, routing.weights)  # fmt: skip
        weights = routing.weights
        if policy.skip_below > 0:
            rows, weights = skip_missed(cfg, rows, weights, valid)
        experts = packed_experts(state.pool, fmt, cfg)
        y = moe_fn(h, jnp.maximum(rows, 0), weights, experts, unique)
        x = module.finish_moe(x_att, h, y)
        if nxt is not None:  # masked, not under a cond: a conditional holding another stays off a CUDA graph
            with jax.named_scope("prefetch"):
                state = dc.prefetch(state, hosts[nxt], policy, layer, nxt, routing.ids, valid, predict_now)
    token = head_token(model, x, root, step, sampling, sampler)
    return DeviceStepOut(token, tuple(kv), state, positions + 1, step + 1)


def device_step_at(model_at: Callable, *args, **kw) -> DeviceStepOut:
    """device_step with the model merged by `model_at` (after) -> model: the executor's lazy
    form (executor.Piece.merge), so that each layer's weights are viewed after its input."""
    return device_step(model_at(None), *args, merge=model_at, **kw)
