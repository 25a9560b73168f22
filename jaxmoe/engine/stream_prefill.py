"""The streamed prefill: every layer's experts move host -> device in a fixed order
while the layer before computes, layer by layer over all chunks of the prompt.

Layer-major: layer l runs over every chunk before layer l+1 starts, so each layer's
experts are sent once however long the prompt, and activation memory is bounded by
the chunk. Each (layer, chunk) is one program making the resident engine's own call
for that layer's chunk (the same attention over the same cache, the layer's experts
as one [E, ...] stack in one batched contraction), so the numbers are equal.

The host walks a PrefillPlan (jaxmoe/offload/prefill_plan.py):
  copy     the cache issues the layer's copies (pinned host -> device, one fetch program)
  stack    wait for that layer's copies (timed: the device has nothing else to do, so
           this is stall), and put them into one stack (the copies are then freed)
  compute  dispatch the layer's chunk programs
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

from jaxmoe.model import LayerSlot, init_kv_cache, kv_layout, moe_ffn
from jaxmoe.offload.cache import fetch_in_jit
from jaxmoe.offload.prefill_plan import PrefillPlan


def fetch_options() -> dict:
    """Compiler options of the injit programs: they rely on XLA overlapping in-program
    copies with compute (a GPU option). Asked when a program is compiled, not at import,
    so importing jaxmoe starts no backend (the pinned pool's size is read when one starts)."""
    return {"xla_gpu_enable_latency_hiding_scheduler": True} if jax.default_backend() == "gpu" else {}



def _dense_chunk(layer, x, positions, start, stack, index, chunk):
    """One chunk through one dense layer; `stack`: its kind's KV stack (donated, written in
    place), `index`: its entry there (an argument: the layers of a kind share the program)."""
    xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # [B, C, D]
    pc = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
    xc, slot, _ = layer(xc, pc, LayerSlot(stack, index), None, moe_ffn)
    return jax.lax.dynamic_update_slice_in_dim(x, xc, start, axis=1), slot.stack


def _moe_chunk(layer, x, positions, valid, start, stack, index, counts, experts, chunk):
    """One chunk through one MoE layer: the resident engine's layer call, with the layer's
    experts stacked as it holds them (cache.stack_experts); KV as `_dense_chunk`'s.
    `counts` [E] accumulates how many valid tokens chose each expert."""
    xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
    pc = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
    vc = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1).reshape(-1)  # [B*C]
    xc, slot, routing = layer(xc, pc, LayerSlot(stack, index), experts, moe_ffn)
    chosen = jax.nn.one_hot(routing.ids, counts.shape[0], dtype=jnp.int32) * vc[:, None, None]  # [B*C, K, E]
    counts = counts + jnp.sum(chosen, axis=(0, 1))
    return jax.lax.dynamic_update_slice_in_dim(x, xc, start, axis=1), slot.stack, counts


def _moe_chunk_fetch(layer, x, positions, valid, start, stack, index, counts, experts, host_next, sent, chunk):
    """_moe_chunk that also copies the next MoE layer's experts `sent` [W] from its pinned host
    layer (the injit variant)."""
    x, stack, counts = _moe_chunk(layer, x, positions, valid, start, stack, index, counts, experts, chunk)
    return x, stack, counts, fetch_in_jit(host_next, sent)


@dataclasses.dataclass
class StreamStats:
    stall_s: float = 0.0  # waiting for a layer's copies with no computation in flight
    transfer_s: float = 0.0  # copy time per layer, from when its copies could start to when they landed


def run_stream(engine, plan: PrefillPlan, x, positions, valid, kv: list) -> tuple[jax.Array, StreamStats]:
    """Execute `plan` on x [B, P, D] (embedded prompt), positions/valid [B, P]; kv (the
    cache's stacks, a list) is updated in place. Returns the final x and the timing stats."""
    run = _StreamRun(engine, plan, x, positions, valid, kv)
    for step in plan.steps:
        getattr(run, step.op)(step)
    return run.x, run.stats


class _StreamRun:
    """The state of one streamed prefill while the host walks its plan, one method per step kind."""

    def __init__(self, engine, plan: PrefillPlan, x, positions, valid, kv: list):
        cfg = engine.config
        self.engine, self.cache, self.cfg, self.plan, self.kv = engine, engine.cache, cfg, plan, kv
        self.x, self.positions, self.valid = x, jnp.asarray(positions), jnp.asarray(valid)
        self.starts = [jnp.int32(s) for s in range(0, x.shape[1], plan.chunk)]
        self.quotas = self.cache.schedule.retain_quotas([m for m in range(cfg.num_layers) if cfg.moe_layers[m]])
        self.width = max(self.quotas.values(), default=0)
        self.layer_experts: dict[int, dict] = {}  # layer -> expert id -> its buffer on the device, until stacked
        self.stacks: dict[int, object] = {}  # layer -> its experts stacked (cache.stack_experts) on the device
        self.copies: dict[int, tuple[list, tuple]] = {}  # layer -> (host copies, clock at issue)
        self.counts: dict[int, jax.Array] = {}  # layer -> [E] tokens that chose each expert
        self.fetch = None  # injit: (layer, experts, (pinned host layer, ids)) for the next program to copy
        # Retained experts stay; so do cached ones the plan takes from the cache for a later layer.
        self.retained: set = set()
        self.to_take = {(s.layer, e) for s in plan.steps if s.op == "copy" for e in s.cached}
        self.stats, self.landed = StreamStats(), (0.0, 0.0)

    def copy(self, step) -> None:
        layer = step.layer
        if step.in_jit:  # the next compute's last program makes these copies
            self.layer_experts[layer], _ = self.cache.stream(layer, (), step.cached)
            self.fetch = (layer, step.sent, self.cache.host_experts(layer, step.sent))
        else:
            self.layer_experts[layer], sent = self.cache.stream(layer, step.sent, step.cached)
            self.copies[layer] = (sent, _clock(self.engine))
        self.to_take -= {(layer, e) for e in step.cached}

    def compute(self, step) -> None:
        layer, piece, kv = step.layer, self.engine.layers[step.layer], self.kv
        stack, index = kv_layout(self.cfg)[layer]
        index = jnp.int32(index)
        static = {"chunk": self.plan.chunk}
        if not self.cfg.moe_layers[layer]:
            for start in self.starts:
                self.x, kv[stack] = self.engine.executor.run(
                    "dense_chunk", _dense_chunk, static, (0, 3), piece, self.x, self.positions, start, kv[stack], index
                )
            return
        experts = self.stacks[layer]
        total = jnp.zeros((self.cfg.num_experts,), jnp.int32)
        for start in self.starts[:-1] if self.fetch else self.starts:
            self.x, kv[stack], total = self.engine.executor.run(
                "moe_chunk", _moe_chunk, static, (0, 4, 6), piece,
                self.x, self.positions, self.valid, start, kv[stack], index, total, experts,
            )  # fmt: skip
        if self.fetch:
            next_layer, sent, host = self.fetch
            self.x, kv[stack], total, fetched = self.engine.executor.run(
                "moe_chunk_fetch", _moe_chunk_fetch, static, (0, 4, 6), piece,
                self.x, self.positions, self.valid, self.starts[-1], kv[stack], index, total, experts, *host,
                options=fetch_options(),
            )  # fmt: skip
            self.layer_experts[next_layer].update(zip(sent, fetched))
            self.fetch = None
        self.counts[layer] = total

    def stack(self, step) -> None:
        self._wait_for_copies(step.layer)
        self.stacks[step.layer] = self.cache.stack(self.layer_experts.pop(step.layer))

    def _wait_for_copies(self, layer: int) -> None:
        """Block until the layer's host-issued copies land: the device has nothing else
        queued (the previous layer was released), so this is stall."""
        sent, issued = self.copies.pop(layer, ([], None))
        if not sent:
            return
        wait_start = time.perf_counter()
        jax.block_until_ready(sent)
        now = _clock(self.engine)
        self.stats.stall_s += now[0] - wait_start
        since = max(issued, self.landed)  # copies of one stream land in order
        self.stats.transfer_s += (now[0] - since[0]) - (now[1] - since[1])
        self.landed = now

    def release(self, step) -> None:
        layer, e_count = step.layer, self.cfg.num_experts
        used = np.asarray(self.counts.pop(layer))  # waits for the layer's computation
        ranked = [e for e in sorted(range(e_count), key=lambda e: (-int(used[e]), e)) if used[e] > 0]
        plan = self.cache.schedule.plan_retain(0, layer, ranked, self.quotas[layer], self.retained | self.to_take)
        self.retained.update((layer, e) for e in plan.experts)
        self.cache.retain(plan, self.stacks.pop(layer), self.width)


def compile_stream(engine, batch: int, p_len: int, chunk: int, cache_len: int, in_jit: bool = False):
    """Compile every layer kind's chunk program for this bucket from shapes alone (nothing
    runs, nothing moves); `in_jit` adds the last chunk's program that also copies the next
    layer's experts (for a cold cache: all of them). Returns the spec of x [B, P, D]."""
    cfg, spec = engine.config, jax.ShapeDtypeStruct
    tokens = spec((batch, p_len), jnp.int32)
    x = spec((batch, p_len, cfg.hidden_size), jnp.dtype(cfg.dtype))
    positions, valid, start = tokens, spec((batch, p_len), jnp.bool_), spec((), jnp.int32)
    kv, index = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len)), spec((), jnp.int32)
    nbytes = engine.store.expert_bytes
    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    host_layer = spec((cfg.num_experts, nbytes), jnp.uint8, sharding=pinned)
    counts = spec((cfg.num_experts,), jnp.int32)
    static = {"chunk": chunk}
    for layer, (piece, (stack, _)) in enumerate(zip(engine.layers, kv_layout(cfg), strict=True)):
        if cfg.moe_layers[layer]:
            args = (x, positions, valid, start, kv[stack], index, counts, engine.cache.stack_spec)
            engine.executor.compile("moe_chunk", _moe_chunk, static, (0, 4, 6), piece, *args)
            if in_jit:
                sent = spec((cfg.num_experts,), jnp.int32)  # a cold cache: every expert
                engine.executor.compile("moe_chunk_fetch", _moe_chunk_fetch, static, (0, 4, 6), piece, *args,
                                        host_layer, sent)  # fmt: skip
        else:
            engine.executor.compile("dense_chunk", _dense_chunk, static, (0, 3), piece, x, positions, start,
                                    kv[stack], index)  # fmt: skip
    return x


def _clock(engine) -> tuple[float, float]:
    """(now, compile seconds so far): compilation inside the loop is not transfer time."""
    return time.perf_counter(), engine.programs.compile_seconds
