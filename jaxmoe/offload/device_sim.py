"""The cache simulator for the policies the device runs: the decode step's own cache code
(device_cache.visit and prefetch) replayed over routing traces, with no bytes moved.

A decode step visits each MoE layer in order: predict the next layer (with a scorer),
bring this layer's experts into the pool, compute, prefetch the next layer's predicted
experts. Replaying that sequence over a trace's routing and scorer probabilities with
the very functions the step program runs gives the engine's counts (hits, misses,
prefetches), not an imitation of them.

Shapes: B rows, T decode steps, Lm MoE layers, K experts per token, E experts.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from jaxmoe.offload import device_cache as dc
from jaxmoe.offload.policy import next_moe_layers


def _token(state, ids, weights, valid, probs, step, *, policy, moe_layers, next_layers, unique, scored):
    """One decode step's cache work: ids and weights [B, Lm, K], valid [B], probs [B, Lm, E]."""
    state, now = dc.begin_token(state, policy, step, scored)
    for j, (layer, nxt) in enumerate(zip(moe_layers, next_layers)):
        scores = (lambda j=j: probs[:, j]) if scored and nxt is not None else None
        state, _ = dc.visit(state, None, policy, layer, nxt if scored else None, ids[:, j], valid, unique, now, scores,
                            weights[:, j])  # fmt: skip
        if scored and nxt is not None:
            state = dc.prefetch(state, None, policy, layer, nxt, ids[:, j], valid, now)
    return state


@functools.partial(jax.jit, static_argnames=("policy", "moe_layers", "next_layers", "unique", "scored"))
def _replay(state, ids, weights, valid, probs, steps, **static):
    """Every step in order (a scan over T): ids and weights [T, B, Lm, K], valid [T, B], probs
    [T, B, Lm, E], steps [T]."""
    body = lambda state, xs: (_token(state, *xs, **static), None)  # noqa: E731
    return jax.lax.scan(body, state, (ids, weights, valid, probs, steps))[0]


def simulate_device(ids: np.ndarray, moe_layers: Sequence[int], num_layers: int, num_experts: int, slots: int,
                    policy: dc.DevicePolicy, *, probs: np.ndarray | None = None, valid: np.ndarray | None = None,
                    slot_of: dict | None = None, first_step: int = 1, weights: np.ndarray | None = None,
                    reuse: dc.ReuseState | None = None) -> dict:  # fmt: skip
    """Replay routing ids [B, T, Lm, K] (rows `valid` [B, T]; scorer probabilities [B, T, Lm, E]
    for the predictor; routing weights [B, T, Lm, K], which `policy.skip_below` needs)
    through a cache of `slots` that starts holding `slot_of` ({(layer, expert): slot}, e.g.
    what a prefill left; `reuse`: the reuse policy's estimates to start from, its host
    policy's `device_arrays`). Returns the device counters (device_cache.COUNTERS)."""
    if policy.skip_below > 0 and weights is None:
        raise ValueError("skip_below needs the routing weights")
    if (policy.name == "reuse") != (reuse is not None):
        raise ValueError("the reuse policy, and only it, starts from its estimates (reuse=)")
    ids = np.asarray(ids, np.int32)
    weights = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    b, t_count, lm, k = ids.shape
    valid = np.ones((b, t_count), bool) if valid is None else np.asarray(valid, bool)
    scored = probs is not None and policy.prefetch > 0
    probs = np.zeros((b, t_count, lm, 0), np.float32) if not scored else np.asarray(probs, np.float32)
    layers = tuple(moe_layers)
    following = tuple(next_moe_layers(layers).values())
    state = dc.new_state(None, slot_of or {}, slots, num_layers, num_experts, reuse=reuse)
    steps = np.arange(first_step, first_step + t_count, dtype=np.int32)
    state = _replay(state, ids.swapaxes(0, 1), weights.swapaxes(0, 1), valid.T, probs.swapaxes(0, 1), steps, policy=policy,
                    moe_layers=layers, next_layers=following, unique=min(num_experts, b * k), scored=scored)  # fmt: skip
    return dict(zip(dc.COUNTERS, (int(c) for c in np.asarray(state.counts))))
