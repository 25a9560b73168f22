"""Sliding-window KV as a ring, attention sinks (gpt-oss), and the padding rule every
cache write follows.

Shapes: B batch, T tokens in this call, R ring slots, Hk key/value heads, Dh head dim.

A sliding layer's cache has R = min(context, window) slots, and position p lives in slot
p mod R. The ring stores no positions: a call's tokens are at contiguous positions from
p0 = positions[:, 0] (every engine prefills and decodes that way), and every position
before p0 was written, so slot j holds the latest position <= p0 - 1 congruent to j. A
token attends over the ring as it was before the call plus the call's own keys (which a
chunk longer than the ring would otherwise overwrite before its earlier queries read them),
then the call's last R tokens are written.

A negative position marks padding (a prompt padded to its bucket): its key is never
written, so a padded row's junk cannot overwrite the keys its decode still needs. Full
caches (`cache_write`, grouped-query and latent attention) drop it too: junk there would
sit beyond the row's position until decode overwrote it, but index -1 wraps to the end.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

PAD_POSITION = -1  # the position engines give a prompt's padding


class RingKV(NamedTuple):
    """A sliding layer's cache: position p's key and value in slot p mod R. Its leaves are
    [B, R, ...] like every layer cache's ([Lk, B, R, ...] stacked: model/kv.py), so engines
    and the server move it as they move the others (serve/batch_kv.py cuts or pads it to the
    R a context's length gives)."""

    k: jax.Array  # [B, R, Hk, Dh]
    v: jax.Array  # [B, R, Hk, Dh]


def mark_padding(positions, valid):
    """positions [B, T] with padding (not `valid`) at PAD_POSITION; numpy stays numpy."""
    where = jnp.where if isinstance(positions, jax.Array) else __import__("numpy").where
    return where(valid, positions, PAD_POSITION)


def cache_write(stack: jax.Array, new: jax.Array, positions: jax.Array, index) -> jax.Array:
    """Full caches stack [Lk, B, S, ...] with new [B, T, ...] written into entry `index` at
    its absolute positions [B, T]; padding (a negative position, which indexing would wrap
    to the end) is dropped."""
    slot = jnp.where(positions >= 0, positions, stack.shape[2])  # slot S: dropped
    return _write(stack, new, slot, index)


def _write(stack: jax.Array, new: jax.Array, slot: jax.Array, index) -> jax.Array:
    """stack [Lk, B, S, ...] with new [B, T, ...] at [index, row, slot[row, t]] (slot S: dropped),
    in place: one scatter into the stack (a slice written back would be copied)."""
    rows = jnp.arange(stack.shape[1])[:, None]
    return stack.at[index, rows, slot].set(new.astype(stack.dtype), mode="drop")


def ring_keys(positions: jax.Array, slots: int) -> jax.Array:
    """[B, R] the position each ring slot holds before this call (negative: none yet)."""
    last = positions[:, :1] - 1  # [B, 1]
    return last - jnp.mod(last - jnp.arange(slots)[None, :], slots)


def ring_write(stack: jax.Array, new: jax.Array, positions: jax.Array, index) -> jax.Array:
    """Rings stack [Lk, B, R, ...] with the call's keys (or values) new [B, T, ...] written
    into entry `index` at slot position mod R: padding and all but the last R tokens are
    dropped, so no slot is written twice (a scatter with repeated indices keeps an
    unspecified one)."""
    slots = stack.shape[2]
    newest = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > newest - slots)
    slot = jnp.where(keep, jnp.mod(positions, slots), slots)  # slot R: dropped
    return _write(stack, new, slot, index)


def window_visible(query_pos: jax.Array, key_pos: jax.Array, window: int) -> jax.Array:
    """[B, T, S] key s visible to query t: written, not after it, within the last `window`
    positions (transformers' sliding mask: q - window < k <= q)."""
    q, k = query_pos[:, :, None], key_pos[:, None, :]
    return (k >= 0) & (k <= q) & (k > q - window)


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array) -> jax.Array:
    """scores [B, Hk, G, T, S] fp32, sinks [H]: the softmax over each row's keys plus the
    head's sink logit, the sink's share dropped (it attends to nothing)."""
    hk, g = scores.shape[1], scores.shape[2]
    sink = jnp.broadcast_to(sinks.astype(scores.dtype).reshape(1, hk, g, 1, 1), scores.shape[:-1] + (1,))
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
