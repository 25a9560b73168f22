"""The weight map: Hugging Face tensor names -> jaxmoe parameters, per family.

Dense weights go to a pure dict shaped like `nnx.state(MoEDecoder).to_pure_dict()`
(torch Linear [out, in] becomes an NNX kernel [in, out]). Routed experts go to
per-layer ExpertWeights stacks. Two expert layouts exist in the wild:
  per expert: `...experts.E.{gate_proj,up_proj,down_proj}.weight` (Mixtral:
              `block_sparse_moe.experts.E.{w1,w3,w2}.weight`)
  fused:      `...mlp.experts.gate_up_proj` [E, 2I, D] and `...mlp.experts.down_proj` [E, D, I]
Each layer must use exactly one of them.
"""

from __future__ import annotations

import re

from jaxmoe.checkpoint.gpt_oss_keys import gpt_oss_expert_targets
from jaxmoe.checkpoint.targets import DenseTarget, ExpertTarget
from jaxmoe.config import MoEConfig

# Buffers some checkpoints carry that are recomputed, never loaded.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def beyond_the_layers(cfg: MoEConfig, name: str) -> bool:
    """DeepSeek-V3 checkpoints carry their multi-token-prediction layers after the last decoder
    layer (`model.layers.{num_hidden_layers + i}`): transformers does not run them, nor jaxmoe."""
    m = _LAYER.match(name)
    return cfg.family == "deepseek_v3" and m is not None and int(m[1]) >= cfg.num_layers


def _linear(prefix: str, path: tuple, d_in: int, d_out: int, bias: bool) -> dict:
    out = {f"{prefix}.weight": DenseTarget(path + ("kernel",), (d_out, d_in), True)}
    if bias:
        out[f"{prefix}.bias"] = DenseTarget(path + ("bias",), (d_out,), False)
    return out


def _norm(prefix: str, path: tuple, dim: int) -> dict:
    return {f"{prefix}.weight": DenseTarget(path + ("weight",), (dim,), False)}


def dense_targets(cfg: MoEConfig) -> dict[str, DenseTarget]:
    """Every dense tensor the checkpoint must contain, by Hugging Face name."""
    d, h, hk, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = {"model.embed_tokens.weight": DenseTarget(("embed_tokens", "embedding"), (cfg.vocab_size, d), False)}
    t |= _norm("model.norm", ("norm",), d)
    if not cfg.tie_word_embeddings:
        t |= _linear("lm_head", ("lm_head",), d, cfg.vocab_size, False)
    moe_prefix = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    for i in range(cfg.num_layers):
        p, path = f"model.layers.{i}", ("layers", i)
        t |= _norm(f"{p}.input_layernorm", path + ("input_layernorm",), d)
        t |= _norm(f"{p}.post_attention_layernorm", path + ("post_attention_layernorm",), d)
        attn = path + ("self_attn",)
        if cfg.attention == "mla":
            t |= mla_targets(cfg, f"{p}.self_attn", attn)
        else:
            t |= _linear(f"{p}.self_attn.q_proj", attn + ("q_proj",), d, h * dh, cfg.qkv_bias)
            t |= _linear(f"{p}.self_attn.k_proj", attn + ("k_proj",), d, hk * dh, cfg.qkv_bias)
            t |= _linear(f"{p}.self_attn.v_proj", attn + ("v_proj",), d, hk * dh, cfg.qkv_bias)
            t |= _linear(f"{p}.self_attn.o_proj", attn + ("o_proj",), h * dh, d, cfg.o_bias)
        if cfg.attention_sinks:
            t[f"{p}.self_attn.sinks"] = DenseTarget(attn + ("sinks",), (h,), False)
        if cfg.qk_norm == "per_head":
            t |= _norm(f"{p}.self_attn.q_norm", attn + ("q_norm",), dh)
            t |= _norm(f"{p}.self_attn.k_norm", attn + ("k_norm",), dh)
        elif cfg.qk_norm == "full":
            t |= _norm(f"{p}.self_attn.q_norm", attn + ("q_norm",), h * dh)
            t |= _norm(f"{p}.self_attn.k_norm", attn + ("k_norm",), hk * dh)
        mlp = path + ("mlp",)
        if not cfg.moe_layers[i]:
            for name, (a, b) in _mlp_shapes(d, cfg.dense_intermediate_size).items():
                t |= _linear(f"{p}.mlp.{name}", mlp + (name,), a, b, False)
            continue
        router = "mlp.router" if cfg.family == "gpt_oss" else f"{moe_prefix}.gate"
        t |= _linear(f"{p}.{router}", mlp + ("gate",), d, cfg.num_experts, cfg.router_bias)
        if cfg.router_correction_bias:
            bias = DenseTarget(mlp + ("e_score_correction_bias",), (cfg.num_experts,), False)
            t[f"{p}.mlp.gate.e_score_correction_bias"] = bias
        if cfg.shared_expert_intermediate_size:
            # DeepSeek's (ungated) shared experts are one MLP named in the plural.
            shared = "shared_expert" if cfg.shared_expert_gated else "shared_experts"
            for name, (a, b) in _mlp_shapes(d, cfg.shared_expert_intermediate_size).items():
                t |= _linear(f"{p}.mlp.{shared}.{name}", mlp + ("shared_expert", name), a, b, False)
            if cfg.shared_expert_gated:
                t |= _linear(f"{p}.mlp.shared_expert_gate", mlp + ("shared_expert_gate",), d, 1, False)
    return t


def mla_targets(cfg: MoEConfig, prefix: str, path: tuple) -> dict:
    """Multi-head latent attention's projections and norms (jaxmoe/model/mla.py)."""
    d, h, r, c = cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    dq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    t = {}
    if r:
        t |= _linear(f"{prefix}.q_a_proj", path + ("q_a_proj",), d, r, cfg.qkv_bias)
        t |= _norm(f"{prefix}.q_a_layernorm", path + ("q_a_layernorm",), r)
        t |= _linear(f"{prefix}.q_b_proj", path + ("q_b_proj",), r, h * dq, False)
    else:
        t |= _linear(f"{prefix}.q_proj", path + ("q_proj",), d, h * dq, False)
    t |= _linear(f"{prefix}.kv_a_proj_with_mqa", path + ("kv_a_proj_with_mqa",), d, c + cfg.qk_rope_head_dim,
                 cfg.qkv_bias)  # fmt: skip
    t |= _norm(f"{prefix}.kv_a_layernorm", path + ("kv_a_layernorm",), c)
    t |= _linear(f"{prefix}.kv_b_proj", path + ("kv_b_proj",), c, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), False)
    t |= _linear(f"{prefix}.o_proj", path + ("o_proj",), h * cfg.v_head_dim, d, cfg.o_bias)
    return t


def _mlp_shapes(d: int, width: int) -> dict[str, tuple[int, int]]:
    return {"gate_proj": (d, width), "up_proj": (d, width), "down_proj": (width, d)}


def router_aliases(cfg: MoEConfig) -> dict[str, str]:
    """Mixtral checkpoints written by transformers 5 name the router `mlp.gate`."""
    if cfg.family != "mixtral":
        return {}
    return {
        f"model.layers.{i}.mlp.gate.weight": f"model.layers.{i}.block_sparse_moe.gate.weight"
        for i in cfg.moe_layer_ids
    }


def expert_targets(cfg: MoEConfig) -> tuple[dict[str, ExpertTarget], dict[str, ExpertTarget]]:
    """(per-expert names, fused names) for every routed-expert tensor. gpt-oss has two
    layouts of its own (jaxmoe/checkpoint/gpt_oss_keys.py): (MXFP4 names, bf16 names)."""
    if cfg.family == "gpt_oss":
        return gpt_oss_expert_targets(cfg)
    d, i_, e = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    if cfg.family == "mixtral":
        prefix, names = "block_sparse_moe.experts", {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        prefix, names = "mlp.experts", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    shapes = {"gate": (i_, d), "up": (i_, d), "down": (d, i_)}
    per_expert, fused = {}, {}
    for layer in cfg.moe_layer_ids:
        p = f"model.layers.{layer}"
        for x in range(e):
            for part, name in names.items():
                per_expert[f"{p}.{prefix}.{x}.{name}.weight"] = ExpertTarget(layer, part, x, shapes[part])
        fused[f"{p}.mlp.experts.gate_up_proj"] = ExpertTarget(layer, "gate_up_fused", None, (e, 2 * i_, d))
        fused[f"{p}.mlp.experts.down_proj"] = ExpertTarget(layer, "down_fused", None, (e, d, i_))
    return per_expert, fused
