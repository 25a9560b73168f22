"""The streamed prefill: every layer's experts move host -> device in a fixed order
while the layer before computes, layer by layer over all chunks of the prompt.

Layer-major: layer l runs over every chunk before layer l+1 starts, so each layer's
experts are sent once however long the prompt, and activation memory is bounded by
the chunk. Each (layer, chunk) is one program computing exactly what the resident
engine's chunk computes for that layer (same attention over the same cache, every
expert as one member of the same batched contraction), so the numbers are equal.

The host walks a PrefillPlan (jaxmoe/offload/prefill_plan.py):
  copy     the cache issues the layer's copies (pinned host -> device, one batched call)
  compute  wait for that layer's copies (timed: the device has nothing else to do, so
           this is stall), then dispatch the layer's chunk programs
  release  read the layer's expert use counts (waits for the computation: the layer's
           streamed experts can be freed), keep its most used experts in the decode
           cache, drop the rest
Shapes: B batch, P prompt bucket, C chunk, D hidden, E experts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.model import combine, expert_rows_from, init_kv_cache, moe_ffn
from jaxmoe.offload.cache import fetch_in_jit
from jaxmoe.offload.prefill_plan import PrefillPlan

# The injit variant relies on XLA overlapping in-program copies with compute.
FETCH_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": True} if jax.default_backend() == "gpu" else {}


def _dense_chunk(layer, x, positions, start, kv, chunk):
    xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # [B, C, D]
    pc = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
    xc, kv, _ = layer(xc, pc, kv, None, moe_ffn)
    return jax.lax.dynamic_update_slice_in_dim(x, xc, start, axis=1), kv


def _moe_chunk(layer, x, positions, valid, start, kv, counts, experts, chunk):
    """One chunk through one MoE layer with every expert of the layer at hand;
    `counts` [E] accumulates how many valid tokens chose each expert."""
    xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
    pc = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
    vc = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1).reshape(-1)  # [B*C]
    xc, kv, h, routing = layer.attend_and_route(xc, pc, kv)
    y = expert_rows_from(h, routing.ids, experts)  # [B*C, K, D]
    xc = layer.finish_moe(xc, h, combine(y, routing.weights, h.dtype))
    chosen = jax.nn.one_hot(routing.ids, len(experts), dtype=jnp.int32) * vc[:, None, None]  # [B*C, K, E]
    counts = counts + jnp.sum(chosen, axis=(0, 1))
    return jax.lax.dynamic_update_slice_in_dim(x, xc, start, axis=1), kv, counts


def _moe_chunk_fetch(layer, x, positions, valid, start, kv, counts, experts, host_next, chunk):
    """_moe_chunk that also copies the next MoE layer's experts (the injit variant)."""
    x, kv, counts = _moe_chunk(layer, x, positions, valid, start, kv, counts, experts, chunk)
    return x, kv, counts, fetch_in_jit(host_next)


@dataclasses.dataclass
class StreamStats:
    stall_s: float = 0.0  # waiting for a layer's copies with no computation in flight
    transfer_s: float = 0.0  # copy time per layer, from when its copies could start to when they landed



def run_stream(engine, plan: PrefillPlan, x, positions, valid, kv: list) -> tuple[jax.Array, StreamStats]:
    """Execute `plan` on x [B, P, D] (embedded prompt), positions/valid [B, P]; kv is
    updated in place (per layer). Returns the final x and the timing stats."""
    cache, cfg = engine.cache, engine.config
    moe_layers = [layer for layer in range(cfg.num_layers) if cfg.moe_layers[layer]]
    quotas = cache.schedule.retain_quotas(moe_layers)
    width = max(quotas.values(), default=0)
    positions, valid = jnp.asarray(positions), jnp.asarray(valid)
    starts = [jnp.int32(s) for s in range(0, x.shape[1], plan.chunk)]
    layer_experts: dict[int, dict] = {}
    copies: dict[int, tuple[list, float]] = {}  # layer -> (host copies, issue time)
    counts: dict[int, jax.Array] = {}
    # Retained experts stay; so do cached ones the plan takes from the cache for a later layer.
    retained: set = set()
    to_take = {(s.layer, e) for s in plan.steps if s.op == "copy" for e in s.cached}
    stats, landed = StreamStats(), (0.0, 0.0)
    fetch = None  # (layer, experts, pinned host arrays) for the injit variant's next program
    for step in plan.steps:
        layer, piece = step.layer, engine.layers[step.layer]
        if step.op == "copy" and step.in_jit:  # made by the next compute's last program
            layer_experts[layer], _ = cache.stream(layer, (), step.cached)
            fetch = (layer, step.sent, cache.host_experts(layer, step.sent))
        elif step.op == "copy":
            layer_experts[layer], sent = cache.stream(layer, step.sent, step.cached)
            copies[layer] = (sent, _clock(engine))
        if step.op == "copy":
            to_take -= {(layer, e) for e in step.cached}
        elif step.op == "compute" and not cfg.moe_layers[layer]:
            for start in starts:
                x, kv[layer] = engine._run(
                    "dense_chunk", _dense_chunk, {"chunk": plan.chunk}, (0, 3), piece, x, positions, start, kv[layer]
                )
        elif step.op == "compute":
            sent, issued = copies.pop(layer, ([], None))
            if sent:
                wait_start = time.perf_counter()
                jax.block_until_ready(sent)
                now = _clock(engine)
                stats.stall_s += now[0] - wait_start
                since = max(issued, landed)  # copies of one stream land in order
                stats.transfer_s += (now[0] - since[0]) - (now[1] - since[1])
                landed = now
            experts = tuple(layer_experts[layer][e] for e in range(cfg.num_experts))
            total = jnp.zeros((cfg.num_experts,), jnp.int32)
            for start in starts[:-1] if fetch else starts:
                x, kv[layer], total = engine._run(
                    "moe_chunk", _moe_chunk, {"chunk": plan.chunk}, (0, 4, 5), piece,
                    x, positions, valid, start, kv[layer], total, experts,
                )  # fmt: skip
            if fetch:
                x, kv[layer], total, fetched = engine._run(
                    "moe_chunk_fetch", _moe_chunk_fetch, {"chunk": plan.chunk}, (0, 4, 5), piece,
                    x, positions, valid, starts[-1], kv[layer], total, experts, fetch[2], options=FETCH_OPTIONS,
                )  # fmt: skip
                layer_experts[fetch[0]].update(zip(fetch[1], fetched))
                fetch = None
            counts[layer] = total
        elif step.op == "release":
            used = np.asarray(counts.pop(layer))  # waits for the layer's computation
            ranked = sorted(range(cfg.num_experts), key=lambda e: (-int(used[e]), e))
            ranked = [e for e in ranked if used[e] > 0]
            retain = cache.schedule.plan_retain(0, layer, ranked, quotas[layer], retained | to_take)
            retained.update((layer, e) for e in retain.experts)
            cache.retain(retain, layer_experts.pop(layer), width)
    return x, stats


def compile_stream(engine, batch: int, p_len: int, chunk: int, cache_len: int) -> jax.ShapeDtypeStruct:
    """Compile every layer kind's chunk program for this bucket from
    shapes alone (nothing runs, nothing moves); returns the spec of x [B, P, D]."""
    cfg, spec = engine.config, jax.ShapeDtypeStruct
    tokens = spec((batch, p_len), jnp.int32)
    x = spec((batch, p_len, cfg.hidden_size), jnp.dtype(cfg.dtype))
    positions, valid, start = tokens, spec((batch, p_len), jnp.bool_), spec((), jnp.int32)
    kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len)[0])
    expert = (spec((cfg.hidden_size, 2 * cfg.expert_intermediate_size), x.dtype),
              spec((cfg.expert_intermediate_size, cfg.hidden_size), x.dtype))  # fmt: skip
    counts = spec((cfg.num_experts,), jnp.int32)
    for layer, piece in enumerate(engine.layers):
        if cfg.moe_layers[layer]:
            args = (x, positions, valid, start, kv, counts, (expert,) * cfg.num_experts)
            engine._program("moe_chunk", _moe_chunk, {"chunk": chunk}, (0, 4, 5), piece, *args)
        else:
            engine._program("dense_chunk", _dense_chunk, {"chunk": chunk}, (0, 3), piece, x, positions, start, kv)
    return x


def _clock(engine) -> tuple[float, float]:
    """(now, compile seconds so far): compilation inside the loop is not transfer time."""
    return time.perf_counter(), engine.programs.compile_seconds
