"""Held-out evaluation of a jaxmoe checkpoint: perplexity, a bigram baseline, routing balance.

Shapes: W windows, T tokens per window, L MoE layers, E experts.
The model is run as shipped (its config dtype, the inference `moe_ffn`) over
windows of T+1 tokens that start every S = T/2 tokens; only each window's last S
targets are scored, so every scored token has at least T/2 tokens of context
(the usual strided perplexity). The bigram is scored on exactly the same targets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.checkpoint import LoadedModel
from jaxmoe.model import init_kv_cache


def model_nll(
    loaded: LoadedModel, windows: np.ndarray, scored: int, batch_size: int = 8
) -> tuple[float, np.ndarray, np.ndarray]:
    """(NLL in nats over each window's last `scored` targets, expert counts [L, E] and summed
    router entropy [L] in bits over every token the model saw)."""
    cfg = loaded.config
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def step(state, experts, window):  # window [B, T+1]
        model = nnx.merge(graphdef, state)
        b, t = window.shape[0], window.shape[1] - 1
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, _, routings = model(window[:, :-1], positions, init_kv_cache(cfg, b, t), experts)
        nll = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden[:, -scored:]), window[:, -scored:])
        routings = [r for r in routings if r is not None]
        counts = jnp.stack([jnp.sum(jax.nn.one_hot(r.ids, cfg.num_experts), axis=(0, 1)) for r in routings])
        probs = [jax.nn.softmax(r.logits.astype(jnp.float32), axis=-1) for r in routings]
        entropy = jnp.stack([-jnp.sum(p * jnp.log2(jnp.maximum(p, 1e-30))) for p in probs])  # [L]
        return jnp.sum(nll), counts, entropy

    total, counts, entropy = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        s, c, h = step(state, loaded.experts, windows[i : i + batch_size])
        total, counts, entropy = total + float(s), counts + np.asarray(c), entropy + np.asarray(h)
    return total, counts, entropy


def bigram_table(rows: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted pair codes a*V+b, their counts, per-token context counts [V]) from the pairs
    inside each row of `rows` [R, n] (one row for a whole stream, or the training windows)."""
    a, b = rows[:, :-1].ravel().astype(np.int64), rows[:, 1:].ravel().astype(np.int64)
    codes, counts = np.unique(a * vocab + b, return_counts=True)
    return codes, counts, np.bincount(a, minlength=vocab)


def bigram_nll(table, windows: np.ndarray, scored: int, vocab: int, k: float) -> float:
    """Total NLL (nats) of each window's last `scored` targets under the add-k smoothed bigram."""
    codes, counts, context = table
    a = windows[:, -scored - 1 : -1].ravel().astype(np.int64)
    b = windows[:, -scored:].ravel().astype(np.int64)
    query = a * vocab + b
    pos = np.minimum(np.searchsorted(codes, query), len(codes) - 1)
    pair = np.where(codes[pos] == query, counts[pos], 0)
    return float(-np.sum(np.log((pair + k) / (context[a] + k * vocab))))


def routing_summary(counts: np.ndarray, entropy_bits: np.ndarray, tokens: int) -> list[dict]:
    """Per MoE layer: entropy of the expert-load distribution and the least/most loaded expert's share."""
    out = []
    for c, h in zip(counts, entropy_bits):
        share = c / c.sum()
        nz = share[share > 0]
        e = len(share)
        out.append({
            "load_entropy_bits": float(-np.sum(nz * np.log2(nz))),
            "max_entropy_bits": math.log2(e),
            "min_share_of_uniform": float(share.min() * e),
            "max_share_of_uniform": float(share.max() * e),
            "mean_router_entropy_bits": float(h / tokens),
        })  # fmt: skip
    return out
