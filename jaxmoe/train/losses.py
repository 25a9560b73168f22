"""Training losses: next-token cross-entropy and the two router regularisers.

Router shapes: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmoe.model import Routing


def next_token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of fp32 logits [B, T, V] against targets [B, T]."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets))


def expert_load(routing: Routing, num_experts: int) -> jax.Array:
    """[E] fraction of the N*K (token, expert) assignments each expert received; sums to 1."""
    return jnp.mean(jax.nn.one_hot(routing.ids, num_experts, dtype=jnp.float32), axis=(0, 1))


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
    """Switch Transformer / OLMoE auxiliary loss: E * sum_e load_e * mean_prob_e.

    It is 1 for a uniform router and grows as load and probability concentrate on
    the same experts; the gradient reaches the router through the probabilities
    (the top-k counts are not differentiable).
    """
    probs = jax.nn.softmax(routing.logits.astype(jnp.float32), axis=-1)  # [N, E]
    load = jax.lax.stop_gradient(expert_load(routing, num_experts))
    return num_experts * jnp.sum(load * jnp.mean(probs, axis=0))


def router_z_loss(routing: Routing) -> jax.Array:
    """ST-MoE z-loss: mean squared log-partition of the router logits, keeping them small."""
    return jnp.mean(jax.nn.logsumexp(routing.logits.astype(jnp.float32), axis=-1) ** 2)
