"""A training MoE function: each (token, k) row computed once, by block-grouped matmuls.

Shapes: N tokens, K experts per token, E experts, D hidden, I expert width,
R = N*K assignments, Bk rows per block, NB = R // Bk + E blocks (static).

`jaxmoe.model.moe_ffn` computes every expert on every token once N*K >= E, which is
E/K times the work a token needs (8x at top-2 of 16). Here assignments are sorted
by expert and each expert's rows padded to whole blocks of Bk, so every block
belongs to one expert and one batched matmul does all of them; no token is
dropped (no capacity), so the result equals `moe_ffn_reference` (tests/test_train.py).
Measured on one CPU core (N=4096, D=256, E=16, I=128, top-2, fp32, forward and
backward): 114 ms, against 529 ms for moe_ffn and 988 ms for lax.ragged_dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.model import ExpertWeights

BLOCK = 128  # 64 was slower (more, smaller matmuls), 256 no faster and pads more


def moe_ffn_blocked(
    x: jax.Array, ids: jax.Array, weights: jax.Array, w: ExpertWeights, num_unique: int | None = None
) -> jax.Array:
    """x [N, D], ids [N, K], weights [N, K] -> [N, D]; `num_unique` is unused (no gather bound needed)."""
    n, k = ids.shape
    e, width, d = w.w_down.shape
    flat = ids.reshape(-1)  # [R]
    sizes = jnp.bincount(flat, length=e)  # [E]
    padded = (sizes + BLOCK - 1) // BLOCK * BLOCK
    padded_end = jnp.cumsum(padded)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sorted_e = flat[order]
    rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[sorted_e]  # row within its expert's group
    dest = (padded_end - padded)[sorted_e] + rank  # [R] row in the padded buffer
    num_blocks = (n * k) // BLOCK + e  # each expert wastes less than one block
    xs = jnp.zeros((num_blocks * BLOCK, d), x.dtype).at[dest].set(x[order // k])
    xs = xs.reshape(num_blocks, BLOCK, d)  # unused rows stay zero, and silu(0) * 0 = 0
    # Blocks past the last group get expert E-1: computed on zeros, never read.
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * BLOCK, side="right"), e - 1)
    gate_up = jnp.einsum("bnd,bdf->bnf", xs, w.w_gate_up[block_expert])  # [NB, Bk, 2I]
    h = jax.nn.silu(gate_up[..., :width]) * gate_up[..., width:]
    ys = jnp.einsum("bni,bid->bnd", h, w.w_down[block_expert]).reshape(-1, d)[dest]  # [R, D] sorted
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, d)  # back to (token, k) order
    # The same combine as the reference: weights' dtype product, fp32 sum over k in k order.
    return jnp.sum((y * weights[..., None]).astype(jnp.float32), axis=1).astype(x.dtype)
