"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Shapes:
  B batch, T tokens in this call, S KV-cache length (static), D hidden, H heads,
  C kv_lora_rank (the latent), R q_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
  Dq = Dn + Dr query/key head dim, Dv v_head_dim.
The cache holds, per token, the normalised latent [C] and the rotated shared key [Dr]:
(C + Dr) numbers where grouped-query attention would hold 2 x H x Dh. Every call expands
the whole cache into per-head keys and values through kv_b_proj, as transformers does, so
the numbers are transformers' (the absorbed form, q_nope folded into the latent space,
rounds differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.model.layers import RMSNorm, linear
from jaxmoe.model.kv import LayerSlot
from jaxmoe.model.matmul import einsum
from jaxmoe.model.rope import apply_rope, apply_rope_pairs, rope_cos_sin
from jaxmoe.model.window import cache_write

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nnx.Module):
    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.num_heads
        dq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = linear(cfg, d, cfg.q_lora_rank, cfg.qkv_bias, rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, cfg.dtype)
            self.q_b_proj = linear(cfg, cfg.q_lora_rank, h * dq, False, rngs)
        else:
            self.q_proj = linear(cfg, d, h * dq, False, rngs)
        self.kv_a_proj_with_mqa = linear(cfg, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qkv_bias, rngs)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, cfg.dtype)
        self.kv_b_proj = linear(cfg, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), False, rngs)
        self.o_proj = linear(cfg, h * cfg.v_head_dim, d, cfg.o_bias, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, kv: LayerSlot) -> tuple[jax.Array, LayerSlot]:
        """x [B, T, D], positions [B, T], the layer's LatentKV slot -> (output [B, T, D], the
        slot with this call's tokens written)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q = q.reshape(b, t, h, dn + dr)
        compressed = self.kv_a_proj_with_mqa(x)  # [B, T, C + Dr]
        latent = self.kv_a_layernorm(compressed[..., : cfg.kv_lora_rank])  # [B, T, C]
        rope_key = compressed[..., cfg.kv_lora_rank :][:, :, None]  # [B, T, 1, Dr]

        cos, sin = rope_cos_sin(positions, dr, cfg.rope_theta, cfg.rope_yarn, x.dtype, pairs=cfg.rope_interleaved)
        rotate = apply_rope_pairs if cfg.rope_interleaved else apply_rope
        q_rot, rope_key = rotate(q[..., dn:], cos, sin), rotate(rope_key, cos, sin)[:, :, 0]

        # As in layers.Attention: write at absolute positions, attend over the whole static cache.
        kv = kv.write(cache_write, (latent, rope_key), positions)
        latent_cache, rope_cache = kv.read()

        s = latent_cache.shape[1]
        expanded = self.kv_b_proj(latent_cache).reshape(b, s, h, dn + dv)  # [B, S, H, Dn + Dv]
        keys = jnp.concatenate([expanded[..., :dn], jnp.broadcast_to(rope_cache[:, :, None], (b, s, h, dr))], -1)
        query = jnp.concatenate([q[..., :dn], q_rot], axis=-1)  # [B, T, H, Dq]
        mscale = cfg.rope_yarn.softmax_mscale if cfg.rope_yarn else 1.0
        scale = (dn + dr) ** -0.5 * mscale * mscale  # in transformers' order
        scores = einsum("bthd,bshd->bhts", query, keys) * scale  # [B, H, T, S]
        visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        scores = jnp.where(visible[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
        out = einsum("bhts,bshd->bthd", probs, expanded[..., dn:]).reshape(b, t, h * dv)
        return self.o_proj(out), kv
