"""The Hugging Face config.json of an OLMoE-family model trained from scratch."""

from __future__ import annotations


def olmoe_hf_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    expert_width: int = 128,
    max_positions: int = 1024,
    eos_token_id: int = 0,
    dtype: str = "float32",
    router_aux_loss_coef: float = 0.01,
) -> dict:
    """OlmoeForCausalLM fields as transformers 5 writes them; tied embeddings keep the file small."""
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": expert_width,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "output_router_logits": False,
        "router_aux_loss_coef": router_aux_loss_coef,  # what it was trained with
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": dtype,
    }
