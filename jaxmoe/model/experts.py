"""Routing and the routed-expert FFN as pure functions over weights passed in.

Shapes:
  N tokens (flattened batch x time), D hidden, E experts (or cache slots),
  K experts per token, I expert width.
Expert weights are never owned by the model: the resident engine passes the full
[E, ...] stacks, an offloaded engine passes its cache slots with ids remapped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.config import MoEConfig


class ExpertWeights(NamedTuple):
    """One layer's routed experts; gate and up are fused so one matmul reads both."""

    w_gate_up: jax.Array  # [E, D, 2I]: columns [:I] gate, [I:] up
    w_down: jax.Array  # [E, I, D]


class Routing(NamedTuple):
    logits: jax.Array  # [N, E] router logits in the activation dtype
    ids: jax.Array  # [N, K] int32 expert ids, descending probability
    weights: jax.Array  # [N, K] fp32 (Mixtral) or activation dtype


def route(cfg: MoEConfig, logits: jax.Array) -> Routing:
    """Softmax over all experts in fp32, top-k, optional renormalisation."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, ids = jax.lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if not cfg.router_weights_fp32:
        top_w = top_w.astype(logits.dtype)
    return Routing(logits, ids.astype(jnp.int32), top_w)


def _combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the K chosen experts: [N, K, D] x [N, K] -> [N, D].

    The product takes the weights' dtype (fp32 for Mixtral) as transformers does;
    the sum over K is in fp32 in a fixed k order, independent of expert placement.
    """
    return jnp.sum((y * weights[..., None]).astype(jnp.float32), axis=1).astype(dtype)


def moe_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
    """Grouped-matmul MoE: sort the N*K (token, expert) rows by expert, one ragged dot per projection.

    x [N, D], ids [N, K] (indices into w's leading axis), weights [N, K] -> [N, D].
    """
    n, k = ids.shape
    num_groups, width = w.w_down.shape[0], w.w_down.shape[1]
    flat = ids.reshape(-1)  # [N*K]
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    group_sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)  # [E]
    xs = jnp.take(x, order // k, axis=0)  # [N*K, D]
    gate_up = jax.lax.ragged_dot(xs, w.w_gate_up, group_sizes)  # [N*K, 2I]
    h = jax.nn.silu(gate_up[:, :width]) * gate_up[:, width:]
    ys = jax.lax.ragged_dot(h, w.w_down, group_sizes)  # [N*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, k) order
    return _combine(y, weights, x.dtype)


def expert_ffn(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """One expert's SwiGLU on [N, D] with w_gate_up [D, 2I], w_down [I, D]."""
    width = w_down.shape[0]
    gate_up = x @ w_gate_up
    return (jax.nn.silu(gate_up[:, :width]) * gate_up[:, width:]) @ w_down


def moe_ffn_reference(x: jax.Array, ids: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
    """Naive reference: every expert on every token, one expert at a time."""
    n, k = ids.shape
    y = jnp.zeros((n, k, x.shape[-1]), x.dtype)
    for e in range(w.w_down.shape[0]):
        out_e = expert_ffn(x, w.w_gate_up[e], w.w_down[e])  # [N, D]
        y = jnp.where((ids == e)[..., None], out_e[:, None, :], y)
    return _combine(y, weights, x.dtype)
