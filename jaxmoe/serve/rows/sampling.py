"""Sampling where every row of a batch has its own parameters and its own seed.

The engines' `sample` takes one SamplingParams for the whole batch as a static argument
(a program per setting); a continuous batch mixes requests with different temperatures,
so here the parameters are arrays [B] and one program serves every mix. Greedy rows are
an argmax, the same op `sample` uses, so their tokens equal the offline engines'. A row
draws from fold_in(key(seed), token index): a request samples the same tokens whatever
row it sits in and whatever else runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.serve.rows.exact import per_row_logits


@dataclasses.dataclass(frozen=True)
class RequestSampling(SamplingParams):
    """One request's sampling: the engines' parameters (and their checks) and its own seed."""

    seed: int = 0


def row_sampling(params: list[RequestSampling | None], steps: np.ndarray) -> tuple:
    """(seeds, steps, temperature, top_k, top_p), each [B] on the device, for rows (None: an empty row, sampled greedily and ignored)."""
    p = [q or RequestSampling() for q in params]
    return (
        jnp.asarray(np.array([q.seed for q in p], np.uint32).view(np.int32)),
        jnp.asarray(np.asarray(steps, np.int32)),
        jnp.asarray(np.array([q.temperature for q in p], np.float32)),
        jnp.asarray(np.array([q.top_k for q in p], np.int32)),
        jnp.asarray(np.array([q.top_p for q in p], np.float32)),
    )


def sample_rows(logits: jax.Array, rows: tuple) -> jax.Array:
    """logits [B, V] fp32 -> tokens [B] int32, each row by its own parameters."""
    seeds, steps, temperature, top_k, top_p = rows
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        neg = jnp.finfo(logits.dtype).min
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ordered = -jnp.sort(-scaled, axis=-1)  # descending
        vocab = logits.shape[-1]
        kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
        k_cut = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
        scaled = jnp.where(scaled < k_cut, neg, scaled)
        ordered = jnp.where(ordered < k_cut, neg, ordered)
        # The smallest prefix whose mass reaches top_p; the top token always survives.
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        p_cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < p_cut, neg, scaled)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), t))(seeds, steps)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # An all-greedy batch (the common case) skips the sort over the vocabulary.
    return jax.lax.cond(jnp.all(temperature == 0), lambda _: greedy, draw, logits)


def row_sampler(sampling: tuple):
    """decode_step's `sampler`: each row's logits from a one-row head, then its own sampling."""
    return lambda model, h: sample_rows(per_row_logits(model, h), sampling)
