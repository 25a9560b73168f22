"""The grouped-matmul MoE path against the per-expert reference loop, and routing semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights, moe_ffn, moe_ffn_reference, num_unique_experts, route


def _weights(e, d, i, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return ExpertWeights(
        jax.random.normal(k1, (e, d, 2 * i), dtype) * 0.2, jax.random.normal(k2, (e, i, d), dtype) * 0.2
    )


def _cfg(e, k, **kw):
    return MoEConfig(
        family="olmoe", vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
        head_dim=8, num_experts=e, top_k=k, expert_intermediate_size=8, moe_layers=(True,), **kw,
    )  # fmt: skip


# (1, 16, 2) and (3, 16, 2) gather a few experts; the others use every expert in place.
@pytest.mark.parametrize("n,e,k", [(1, 16, 2), (3, 16, 2), (7, 8, 2), (33, 16, 4), (64, 8, 8)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fast_path_equals_per_expert_loop(n, e, k, dtype, tol):
    x = jax.random.normal(jax.random.key(1), (n, 16), dtype)
    w = _weights(e, 16, 8, dtype)
    routing = route(_cfg(e, k, dtype=jnp.dtype(dtype).name), x @ jax.random.normal(jax.random.key(2), (16, e), dtype))
    fast = moe_ffn(x, routing.ids, routing.weights, w, num_unique_experts(e, n, k))
    ref = moe_ffn_reference(x, routing.ids, routing.weights, w)
    assert fast.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("n,slots", [(3, 8), (3, 20), (9, 8), (9, 20)])
def test_fast_path_ignores_expert_placement(n, slots):
    """Experts moved into other slots of a (possibly larger) pool, ids remapped: identical output.
    This is what lets a device cache hold experts anywhere."""
    x = jax.random.normal(jax.random.key(3), (n, 16))
    w = _weights(8, 16, 8, jnp.float32)
    ids = jax.random.randint(jax.random.key(4), (n, 2), 0, 8)
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(5), (n, 2)))
    slot_of = np.random.RandomState(0).permutation(slots)[:8]  # expert e lives in slot slot_of[e]
    pool = ExpertWeights(
        jnp.zeros((slots, 16, 16)).at[slot_of].set(w.w_gate_up), jnp.zeros((slots, 8, 16)).at[slot_of].set(w.w_down)
    )
    unique = num_unique_experts(8, n, 2)  # the same static bound in both, as the engines use
    np.testing.assert_array_equal(
        np.asarray(moe_ffn(x, ids, weights, w, unique)),
        np.asarray(moe_ffn(x, jnp.asarray(slot_of)[ids], weights, pool, unique)),
    )


def test_route_softmax_topk_renormalise():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
    probs = np.exp([2.0, 1.0, 0.5, -1.0]) / np.exp([2.0, 1.0, 0.5, -1.0]).sum()
    plain = route(_cfg(4, 2, norm_topk_prob=False, dtype="float32"), logits)
    assert plain.ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(np.asarray(plain.weights[0]), probs[:2], rtol=1e-6)
    renorm = route(_cfg(4, 2, norm_topk_prob=True, dtype="float32"), logits)
    np.testing.assert_allclose(np.asarray(renorm.weights[0]), probs[:2] / probs[:2].sum(), rtol=1e-6)


def test_router_weight_dtype_follows_family():
    logits = jnp.ones((3, 4), jnp.bfloat16)
    assert route(_cfg(4, 2, dtype="bfloat16"), logits).weights.dtype == jnp.bfloat16
    assert route(_cfg(4, 2, dtype="bfloat16", router_weights_fp32=True), logits).weights.dtype == jnp.float32


def test_per_token_moe_equals_one_token_steps():
    """The server's per-row experts (serve/rows/exact.py) give each token exactly what a
    one-token call gives it, whatever the batch's own unique bound."""
    from jaxmoe.serve.rows.exact import per_token_moe

    n, e, k = 9, 16, 2
    x = jax.random.normal(jax.random.key(3), (n, 16), jnp.bfloat16)
    w = _weights(e, 16, 8, jnp.bfloat16)
    routing = route(_cfg(e, k), x @ jax.random.normal(jax.random.key(4), (16, e), jnp.bfloat16))
    rows = jax.jit(per_token_moe, static_argnums=4)(x, routing.ids, routing.weights, w, num_unique_experts(e, n, k))
    one = jax.jit(moe_ffn, static_argnums=4)
    for r in range(n):
        alone = one(x[r : r + 1], routing.ids[r : r + 1], routing.weights[r : r + 1], w, num_unique_experts(e, 1, k))
        np.testing.assert_array_equal(np.asarray(rows[r], np.float32), np.asarray(alone[0], np.float32))
