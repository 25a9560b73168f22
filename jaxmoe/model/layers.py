"""Dense building blocks: RMSNorm, RoPE, attention over a static KV cache, dense MLP.

Shapes:
  B batch, T tokens in this call, S KV-cache length (static; a sliding layer's ring
  R = min(S, window)), D hidden,
  H query heads, Hk key/value heads, G = H // Hk, Dh head dim, I MLP width.
Attribute names follow the Hugging Face modules so the weight map stays readable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.model.matmul import dot_fp32, einsum
from jaxmoe.model.rope import apply_rope, rope_cos_sin
from jaxmoe.model.window import cache_write, ring_keys, ring_write, softmax_with_sinks, window_visible


def _dtype(cfg: MoEConfig):
    return jnp.dtype(cfg.dtype)


def linear(cfg: MoEConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs, compute_dtype=None) -> nnx.Linear:
    """A Linear holding its weight in the config's dtype, computing in `compute_dtype` (default: the same)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=compute_dtype or _dtype(cfg),
        param_dtype=_dtype(cfg),
        kernel_init=nnx.initializers.normal(0.02),
        dot_general=dot_fp32,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, scale_fp32: bool = False):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps, self.scale_fp32 = eps, scale_fp32

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in fp32, cast back, then scale: the order transformers uses (gpt-oss
        # scales the fp32 value and casts last: `scale_fp32`).
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale_fp32:
            return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs, layer: int = 0):
        self.cfg = cfg
        self.sliding = cfg.is_sliding(layer)  # its cache is a ring of the window (model/window.py)
        h, hk, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = linear(cfg, d, h * dh, cfg.qkv_bias, rngs)
        self.k_proj = linear(cfg, d, hk * dh, cfg.qkv_bias, rngs)
        self.v_proj = linear(cfg, d, hk * dh, cfg.qkv_bias, rngs)
        self.o_proj = linear(cfg, h * dh, d, cfg.o_bias, rngs)
        # Qwen3 normalises each head; OLMoE the whole projected width before the head split.
        norm_dims = {"per_head": (dh, dh), "full": (h * dh, hk * dh)}.get(cfg.qk_norm)
        if norm_dims:
            self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps, _dtype(cfg))
            self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps, _dtype(cfg))
        if cfg.attention_sinks:
            self.sinks = nnx.Param(jnp.zeros((h,), _dtype(cfg)))

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] absolute position of each token
        kv,  # LayerSlot: this layer's LayerKV (k, v [B, S, Hk, Dh]) or a sliding layer's RingKV [B, R, Hk, Dh]
    ):
        """(output [B, T, D], the slot with this call's keys and values written)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, hk, dh), v.reshape(b, t, hk, dh)
        if cfg.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions, dh, cfg.rope_theta, cfg.rope_yarn, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.sliding:
            # Keys: the ring before this call, then this call's own (model/window.py).
            k_cache, v_cache = kv.read()
            key_pos = jnp.concatenate([ring_keys(positions, k_cache.shape[1]), positions], axis=1)
            keys = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1)
            values = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1)
            visible = window_visible(positions, key_pos, cfg.sliding_window)  # [B, T, R + T]
            kv = kv.write(ring_write, (k, v), positions)
        else:
            # Write this call's keys/values at their absolute positions, then attend over
            # the whole static cache: every call sees the same key length S, so a prompt
            # gives the same numbers alone or padded inside a batch. Padding (a negative
            # position) is not written.
            kv = kv.write(cache_write, (k, v), positions)
            keys, values = kv.read()
            visible = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]

        q = q.reshape(b, t, hk, h // hk, dh)
        scores = einsum("btkgd,bskd->bkgts", q, keys) * (dh**-0.5)  # [B, Hk, G, T, S]
        scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        if cfg.attention_sinks:
            probs = softmax_with_sinks(scores, self.sinks[...]).astype(q.dtype)
        else:
            probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h * dh)
        return self.o_proj(out), kv


class DenseMLP(nnx.Module):
    """SwiGLU MLP: dense layers (`mlp_only_layers`) and Qwen2-MoE's shared expert."""

    def __init__(self, cfg: MoEConfig, width: int, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.gate_proj = linear(cfg, d, width, False, rngs)
        self.up_proj = linear(cfg, d, width, False, rngs)
        self.down_proj = linear(cfg, width, d, False, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
