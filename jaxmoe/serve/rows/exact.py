"""Each row of the continuous batch computed with the shapes of a batch of one, where
XLA's result depends on the batch.

XLA's CPU kernels choose their blocking by shape, so a batched matmul does not always
give a row the bits that row gets alone. Measured on the shipped model: the LM head
([B, D] x [D, V]) differs from B = 2 on, and a greedy token at a near tie flips
("In the beginning", token 26) once a step has 8 or more rows. A served request must get
the tokens `generate.py` gives it alone, so the serve decode step computes each row's
logits as a one-row head (a loop over rows), and each token's routed experts as a
one-token step does (its own K experts, shapes [K, 1, D]). The dense projections
measured row-invariant and stay batched. On a CPU this is about the same work (the
batched MoE computes all U experts over all N tokens); on a GPU the loops cost
parallelism and the per-token experts read each expert once per row, not once per step.
"""

from __future__ import annotations

import jax

from jaxmoe.model.decoder import head_logits
from jaxmoe.model.experts import combine, expert_rows


def per_row_logits(model, h: jax.Array) -> jax.Array:
    """h [B, D] -> fp32 logits [B, V], each row through the head alone."""
    return jax.lax.map(lambda row: head_logits(model.embed_tokens, model.lm_head, row[None])[0], h)


def per_token_moe(x: jax.Array, ids: jax.Array, weights: jax.Array, w, num_unique: int) -> jax.Array:
    """moe_ffn's contract (x [N, D], ids [N, K], weights [N, K] -> [N, D]), each token's
    experts computed as a one-token step computes them (`num_unique` = K, not the batch's)."""
    k = ids.shape[1]
    one = lambda args: expert_rows(args[0][None], args[1][None], w, k)[0]  # noqa: E731  [K, D]
    return combine(jax.lax.map(one, (x, ids)), weights, x.dtype)
