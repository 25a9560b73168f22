"""The MoE decoder: embeddings, decoder layers, final norm and LM head.

Shapes:
  B batch, T tokens in this call, S KV-cache length (a sliding layer's ring: min(S, window)),
  D hidden, V vocab, L layers, E experts, K experts per token.
The module holds the dense weights only. Routed experts arrive as an argument
(`experts[l]` is an ExpertWeights for MoE layers, None for dense ones) and the
MoE function is chosen by the caller, so the same module serves the resident
engine, an offloaded engine and the per-expert reference.
Each phase runs in a `jax.named_scope` (attention, router, experts, combine,
shared_expert, mlp, head) so a profile names what it shows; a scope is op
metadata only and leaves the numbers unchanged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.model.experts import ExpertWeights, Routing, expert_activation, moe_ffn, num_unique_experts, route
from jaxmoe.model.layers import Attention, DenseMLP, RMSNorm, linear
from jaxmoe.model.matmul import einsum
from jaxmoe.model.kv import LayerCache, LayerSlot, layer_slot, with_slot
from jaxmoe.model.mla import LatentAttention

MoEFn = Callable[..., jax.Array]  # (x, ids, weights, experts, num_unique) -> [N, D]
Experts = Sequence[ExpertWeights | None]  # one entry per layer


class SparseMoeBlock(nnx.Module):
    """Router plus (Qwen2-MoE) the always-on shared expert; routed experts come from outside."""

    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # DeepSeek computes its router in fp32 from fp32 copies of the input and the weight.
        compute = jnp.float32 if cfg.router_logits_fp32 else None
        self.gate = linear(cfg, cfg.hidden_size, cfg.num_experts, cfg.router_bias, rngs, compute_dtype=compute)
        if cfg.router_correction_bias:
            self.e_score_correction_bias = nnx.Param(jnp.zeros((cfg.num_experts,), cfg.dtype))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg, cfg.shared_expert_intermediate_size, rngs)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = linear(cfg, cfg.hidden_size, 1, False, rngs)

    @jax.named_scope("router")
    def route(self, h: jax.Array) -> Routing:
        bias = self.e_score_correction_bias[...] if self.cfg.router_correction_bias else None
        return route(self.cfg, self.gate(h), bias)._replace(inputs=h)

    def add_shared(self, h: jax.Array, routed: jax.Array) -> jax.Array:
        """Routed output [N, D] plus, for Qwen2-MoE, the gated shared expert."""
        if not self.cfg.shared_expert_intermediate_size:
            return routed
        with jax.named_scope("shared_expert"):
            if not self.cfg.shared_expert_gated:
                return routed + self.shared_expert(h)
            return routed + jax.nn.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MoEConfig, layer: int, rngs: nnx.Rngs):
        self.is_moe = cfg.moe_layers[layer]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.norm_scale_fp32)
        self.self_attn = LatentAttention(cfg, rngs) if cfg.attention == "mla" else Attention(cfg, rngs, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.norm_scale_fp32)
        if self.is_moe:
            self.mlp = SparseMoeBlock(cfg, rngs)
        else:
            self.mlp = DenseMLP(cfg, cfg.dense_intermediate_size, rngs)

    @jax.named_scope("attention")
    def attend(self, x: jax.Array, positions: jax.Array, kv: LayerSlot) -> tuple[jax.Array, LayerSlot]:
        out, kv = self.self_attn(self.input_layernorm(x), positions, kv)
        return x + out, kv

    def attend_and_route(self, x: jax.Array, positions: jax.Array, kv: LayerSlot):
        """The half of a MoE layer before its experts: (x, kv, h [B*T, D], routing)."""
        x, kv = self.attend(x, positions, kv)
        with jax.named_scope("router"):  # the norm is the router's input (the experts' too)
            h = self.post_attention_layernorm(x).reshape(-1, x.shape[-1])
        return x, kv, h, self.mlp.route(h)

    def finish_moe(self, x: jax.Array, h: jax.Array, routed: jax.Array) -> jax.Array:
        """The half after: residual plus routed output [B*T, D] (plus any shared expert)."""
        return x + self.mlp.add_shared(h, routed).reshape(x.shape)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv: LayerSlot, experts: ExpertWeights | None, moe_fn: MoEFn
    ) -> tuple[jax.Array, LayerSlot, Routing | None]:
        if not self.is_moe:
            x, kv = self.attend(x, positions, kv)
            with jax.named_scope("mlp"):
                return x + self.mlp(self.post_attention_layernorm(x)), kv, None
        x, kv, h, routing = self.attend_and_route(x, positions, kv)
        unique = num_unique_experts(self.mlp.cfg.num_experts, *routing.ids.shape)
        return self.finish_moe(x, h, moe_fn(h, routing.ids, routing.weights, experts, unique)), kv, routing


class MoEDecoder(nnx.Module):
    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.norm_scale_fp32)
        # Tied embeddings: the embedding matrix is the head.
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        kv: Sequence[LayerCache],  # the cache's stacks (model/kv.py)
        experts: Experts,
        moe_fn: MoEFn = moe_ffn,
    ) -> tuple[jax.Array, tuple[LayerCache, ...], tuple[Routing | None, ...]]:
        """Final-norm hidden states [B, T, D], the updated cache and each layer's routing."""
        x = self.embed_tokens(tokens)
        routings = []
        for i, (layer, layer_experts) in enumerate(zip(self.layers, experts, strict=True)):
            x, slot, routing = layer(x, positions, layer_slot(kv, self.cfg, i), layer_experts, moe_fn)
            kv = with_slot(kv, self.cfg, i, slot)
            routings.append(routing)
        return self.norm(x), tuple(kv), tuple(routings)

    def logits(self, h: jax.Array) -> jax.Array:
        """[..., D] -> fp32 [..., V]."""
        return head_logits(self.embed_tokens, self.lm_head, h)


@jax.named_scope("head")
def head_logits(embed: nnx.Embed, lm_head: nnx.Linear | None, h: jax.Array) -> jax.Array:
    out = einsum("...d,vd->...v", h, embed.embedding[...].astype(h.dtype)) if lm_head is None else lm_head(h)
    return out.astype(jnp.float32)


def init_experts(cfg: MoEConfig, key: jax.Array) -> tuple[ExpertWeights | None, ...]:
    """Random routed experts (normal, std 0.02) for every MoE layer."""
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    out = []
    for layer, key_l in enumerate(jax.random.split(key, cfg.num_layers)):
        if not cfg.moe_layers[layer]:
            out.append(None)
            continue
        k1, k2 = jax.random.split(key_l)
        w = ExpertWeights(
            (0.02 * jax.random.normal(k1, (e, d, 2 * i))).astype(cfg.dtype),
            (0.02 * jax.random.normal(k2, (e, i, d))).astype(cfg.dtype),
        )
        if cfg.expert_bias:  # zero, as transformers initialises them
            w = w._replace(b_gate_up=jnp.zeros((e, 2 * i), cfg.dtype), b_down=jnp.zeros((e, d), cfg.dtype),
                           act=expert_activation(cfg))  # fmt: skip
        out.append(w)
    return tuple(out)
