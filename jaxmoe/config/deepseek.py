"""DeepSeek-V2/V3 `config.json` -> MoEConfig: multi-head latent attention, YaRN, shared
experts, dense first layers and the two routers, as transformers' DeepseekV2/V3 classes
read the same fields (DeepSeek-V2-Lite, DeepSeek-V3/R1 and Kimi K2 share this layout).
"""

from __future__ import annotations

from jaxmoe.config.moe_config import ConfigError, MoEConfig, resolve_yarn


def _router(hf: dict, family: str) -> dict:
    """V2: softmax scores, greedy or group-limited by each group's best expert; V3: sigmoid
    scores plus a correction bias for choosing, groups scored by their two best experts."""
    groups, topk_groups = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if family == "deepseek_v2":
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method={method!r} is not supported (greedy or group_limited_greedy)")
        if hf.get("norm_topk_prob"):
            # transformers' DeepseekV2 router never renormalises; DeepSeek's own code would.
            raise ConfigError("norm_topk_prob=true is not supported for DeepSeek-V2 (transformers ignores it)")
        if method == "greedy":
            groups, topk_groups = 1, 1
        return dict(router_groups=groups, router_topk_groups=topk_groups, router_group_score="max",
                    norm_topk_prob=False)  # fmt: skip
    method = hf.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise ConfigError(f"topk_method={method!r} is not supported for DeepSeek-V3 (only 'noaux_tc')")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"scoring_func={scoring!r} is not supported for DeepSeek-V3 (only 'sigmoid')")
    return dict(router_scoring="sigmoid", router_correction_bias=True, router_groups=groups,
                router_topk_groups=topk_groups, router_group_score="top2_sum",
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)))  # fmt: skip


def deepseek_config(hf: dict, family: str, common: dict) -> MoEConfig:
    heads = common["num_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        # MLA expands the latent into every head; transformers would repeat those heads again.
        raise ConfigError(f"num_key_value_heads={kv_heads} must equal num_attention_heads={heads} for MLA")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported (transformers reads 1)")
    if hf.get("rope_interleave") is False and family == "deepseek_v2":
        raise ConfigError("rope_interleave=false is not supported for DeepSeek-V2")
    experts = hf["n_routed_experts"]
    first_dense = hf.get("first_k_dense_replace") or 0
    rope_dim, nope_dim = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    if rope_dim % 2:
        raise ConfigError(f"qk_rope_head_dim={rope_dim} must be even")
    bias = bool(hf.get("attention_bias", False))
    shared = (hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"]
    return MoEConfig(
        **common | dict(num_kv_heads=heads, head_dim=nope_dim + rope_dim),
        num_experts=experts,
        expert_intermediate_size=hf["moe_intermediate_size"],
        moe_layers=tuple(i >= first_dense for i in range(common["num_layers"])),
        dense_intermediate_size=hf["intermediate_size"],
        shared_expert_intermediate_size=shared,
        shared_expert_gated=False,
        qkv_bias=bias,  # q_a_proj and kv_a_proj_with_mqa
        o_bias=bias,
        attention="mla",
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=hf["v_head_dim"],
        # V2 rotates pairs (its complex form); V3 pairs unless rope_interleave=false, then halves.
        rope_interleaved=family == "deepseek_v2" or hf.get("rope_interleave", True) is not False,
        rope_yarn=resolve_yarn(hf, common["max_position_embeddings"]),
        router_logits_fp32=True,
        router_weights_fp32=True,  # the expert outputs are weighted in fp32, as Mixtral's
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        **_router(hf, family),
    )
