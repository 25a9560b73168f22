"""The routed prefill: a prompt chunk through the layers one program at a time, loading
only the experts its tokens route to (short prompts, where streaming every expert would
move more bytes than it saves).

Per MoE layer: attention and routing (one program), one host read of the routing ids,
the schedule plans the pass(es), the cache copies the misses into the pool, then the
expert program.
A chunk can route to more experts than the cache holds: the layer then takes several
passes, each computing the rows whose experts are resident (`in_pass`), every row
exactly as the resident kernel computes it.

Shapes: B batch, T tokens in the chunk, N = B x T, D hidden, K experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.model import LayerSlot, combine, expert_rows, kv_layout, moe_ffn, num_unique_experts
from jaxmoe.offload.cache import pool_experts


def embed(ends, tokens):
    return ends.embed_tokens(tokens)


def dense_layer(layer, x, positions, stack, index):
    """A dense layer on x; `stack`: its kind's KV stack (donated, written in place), `index`:
    its entry there (an argument: the layers of a kind share the program)."""
    x, slot, _ = layer(x, positions, LayerSlot(stack, index), None, moe_ffn)
    return x, slot.stack


def attend_route(layer, x, positions, stack, index):
    x, slot, h, routing = layer.attend_and_route(x, positions, LayerSlot(stack, index))
    return x, slot.stack, h, routing.ids, routing.weights


def experts_pass(layer, x, h, slot_ids, in_pass, weights, y_prev, pool, num_unique, fmt):
    """Compute this pass's rows from the pool (the cache copied the pass's loads into it), finish
    the layer. Rows outside the pass keep y_prev, so after a layer's last pass y holds every row.
    """
    anchor = slot_ids.reshape(-1)[jnp.argmax(in_pass.reshape(-1))]  # any slot of this pass
    ids = jnp.where(in_pass, slot_ids, anchor)
    y_pass = expert_rows(h, ids, pool_experts(pool, fmt, layer.mlp.cfg), num_unique)
    y = jnp.where(in_pass[..., None], y_pass, y_prev)
    x = layer.finish_moe(x, h, combine(y, weights, h.dtype))
    return x, y


def routed_chunk(engine, tokens, positions: np.ndarray, valid: np.ndarray, kv: list) -> jax.Array:
    """tokens/positions/valid [B, T] (rows not `valid` load no experts); kv (the cache's
    stacks, a list) is updated in place, per layer. Returns x [B, T, D] after the last layer."""
    run, cache, clock = engine.executor.run, engine.cache, engine.executor.clock
    x = run("embed", embed, {}, (), engine.ends, tokens)
    positions, valid_rows = jnp.asarray(positions), valid.reshape(-1)
    for layer, (piece, (stack, index)) in enumerate(zip(engine.layers, kv_layout(engine.config), strict=True)):
        if not engine.config.moe_layers[layer]:
            x, kv[stack] = run("dense", dense_layer, {}, (2,), piece, x, positions, kv[stack], jnp.int32(index))
            continue
        x_in, kv[stack], h, ids, weights = run("attend_route", attend_route, {}, (2,), piece, x, positions, kv[stack],
                                               jnp.int32(index))  # fmt: skip
        with clock.phase("host_read"):  # the one host sync of this layer
            ids_host = np.asarray(ids)
        n, k = ids_host.shape
        # A pass computes at most the cache's slots (each expert one member of the batched
        # contraction, so the count does not change the values).
        unique = min(num_unique_experts(engine.config.num_experts, n, k), cache.num_slots)
        y, x = jnp.zeros((n, k, x_in.shape[-1]), x_in.dtype), x_in
        with clock.phase("schedule"):
            plans = cache.schedule.plan_layer(0, layer, np.unique(ids_host[valid_rows]))
        for plan in plans:
            cache.wait(cache.issue(plan))
            with clock.phase("schedule"):
                table = np.full(engine.config.num_experts, -1, np.int32)
                table[list(plan.experts)] = plan.slots
                slot_ids = table[ids_host]
                in_pass = (slot_ids >= 0) & valid_rows[:, None]
            x, y = run(
                "experts", experts_pass, {"num_unique": unique, "fmt": cache.format}, (), piece, x_in, h,
                jnp.asarray(np.maximum(slot_ids, 0)), jnp.asarray(in_pass), weights, y, cache.pool,
            )  # fmt: skip
    return x


def compile_routed(engine, batch: int, tokens: int, cache_len: int):
    """Compile from shapes what `routed_chunk` runs on [batch, tokens]; returns the spec of x."""
    from jaxmoe.model import init_kv_cache

    cfg, spec, compile_ = engine.config, jax.ShapeDtypeStruct, engine.executor.compile
    plain = lambda tree: jax.tree.map(lambda o: spec(o.shape, o.dtype), tree)  # noqa: E731
    x = plain(compile_("embed", embed, {}, (), engine.ends, spec((batch, tokens), jnp.int32)).out_info)
    positions = spec((batch, tokens), jnp.int32)
    kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len))
    index = spec((), jnp.int32)
    cache = engine.cache
    pool = plain(cache.pool)
    for layer, (piece, (stack, _)) in enumerate(zip(engine.layers, kv_layout(cfg), strict=True)):
        if not cfg.moe_layers[layer]:
            compile_("dense", dense_layer, {}, (2,), piece, x, positions, kv[stack], index)
            continue
        out = compile_("attend_route", attend_route, {}, (2,), piece, x, positions, kv[stack], index).out_info
        x_in, _, h, ids, weights = plain(out)
        n, k = ids.shape
        unique = min(num_unique_experts(cfg.num_experts, n, k), cache.num_slots)
        args = (x_in, h, spec((n, k), jnp.int32), spec((n, k), jnp.bool_), weights,
                spec((n, k, cfg.hidden_size), x.dtype), pool)  # fmt: skip
        static = {"num_unique": unique, "fmt": cache.format}
        x = plain(compile_("experts", experts_pass, static, (), piece, *args).out_info[0])
    return x
