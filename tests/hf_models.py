"""Tiny random Hugging Face MoE models, built locally (no downloads).

`tiny_hf_model(family, variant)` covers the options each family's code path
branches on; parity, conversion and generation tests share it. The large
initializer_range keeps logits well separated, so greedy tokens are stable and
a wrong weight shows up far above fp32 noise.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

# A module that imports this one needs torch and transformers (the test extra): without them
# (the GPU image's jax on Python 3.12, scripts/test_gpu_jax.sh) it is skipped, not an error.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
VARIANTS = {
    "mixtral": ("base", "mha_tied"),
    "olmoe": ("base", "clip_norm"),
    "qwen2_moe": ("base", "sparse_step"),
    "qwen3_moe": ("base", "dense_layer"),
    "gpt_oss": ("base", "yarn_window"),
}

_COMMON = dict(
    vocab_size=32,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    initializer_range=0.2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# Expert width 24 (2I=48 != D=64) so a transposed expert tensor fails the shape check.
_VARIANT_KWARGS = {
    ("mixtral", "base"): dict(intermediate_size=24, num_local_experts=4),
    ("mixtral", "mha_tied"): dict(
        intermediate_size=24, num_local_experts=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    ("olmoe", "base"): dict(intermediate_size=24, num_experts=4, clip_qkv=None, norm_topk_prob=False),
    ("olmoe", "clip_norm"): dict(intermediate_size=24, num_experts=4, clip_qkv=0.5, norm_topk_prob=True),
    ("qwen2_moe", "base"): dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=36,
        num_experts=4,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        qkv_bias=False,
    ),
    ("qwen2_moe", "sparse_step"): dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=36,
        num_experts=4,
        decoder_sparse_step=2,
        norm_topk_prob=True,
        qkv_bias=True,
    ),
    ("qwen3_moe", "base"): dict(
        head_dim=24, intermediate_size=40, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True
    ),
    ("qwen3_moe", "dense_layer"): dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        num_experts=4,
        mlp_only_layers=[0],
        num_key_value_heads=4,
        norm_topk_prob=False,
    ),
}

# Wider variants for the offloading tests: 16 experts over 3 layers give a cache something to do.
_WIDE = dict(num_hidden_layers=3, intermediate_size=24, moe_intermediate_size=16, num_experts=16)
_VARIANT_KWARGS |= {
    ("mixtral", "wide"): dict(num_hidden_layers=3, intermediate_size=16, num_local_experts=16),
    ("olmoe", "wide"): dict(num_hidden_layers=3, intermediate_size=16, num_experts=16, num_experts_per_tok=3),
    # One layer: its routing depends on the fed tokens alone (tests/test_skip.py replays an approximate decode).
    ("olmoe", "single"): dict(num_hidden_layers=1, intermediate_size=16, num_experts=16, num_experts_per_tok=3),
    ("qwen2_moe", "wide"): dict(_WIDE, shared_expert_intermediate_size=20, mlp_only_layers=[1], norm_topk_prob=True),
    ("qwen3_moe", "wide"): dict(_WIDE, head_dim=24, num_experts_per_tok=3, norm_topk_prob=True),
}

# gpt-oss: windows shorter than the prompts so sliding layers drop keys; its default YaRN
# (factor 32) in "base", a truncated YaRN with its own factor in "yarn_window". Head dim 16,
# expert width 32 (MXFP4 blocks are 32 wide).
_GPT_OSS = dict(head_dim=16, intermediate_size=32, num_local_experts=4, sliding_window=4)
_VARIANT_KWARGS |= {
    ("gpt_oss", "base"): _GPT_OSS,
    ("gpt_oss", "yarn_window"): dict(
        _GPT_OSS, num_hidden_layers=3, num_key_value_heads=4, sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=True, original_max_position_embeddings=64),
    ),
    ("gpt_oss", "wide"): dict(_GPT_OSS, num_hidden_layers=3, num_local_experts=16, num_experts_per_tok=3, sliding_window=5,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}  # fmt: skip

# DeepSeek-V2/V3 (tests/test_deepseek.py): multi-head latent attention with and without a
# low-rank query, YaRN or plain RoPE, dense first layers, shared experts, and each router.
# V2 keeps one group: scored by its best expert, groups as many as top_k could not bind.
_MLA = dict(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8,
            kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=16, n_shared_experts=1)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
DEEPSEEK_VARIANTS = {
    "deepseek_v2": ("base", "group_limited"),
    "deepseek_v3": ("base", "ungrouped"),
}  # fmt: skip
_VARIANT_KWARGS |= {
    ("deepseek_v2", "base"): dict(_MLA, q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1),
    ("deepseek_v2", "group_limited"): dict(
        _MLA, q_lora_rank=16, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        routed_scaling_factor=1.5, n_shared_experts=2, rope_parameters=_YARN,
    ),
    ("deepseek_v3", "base"): dict(
        _MLA, q_lora_rank=16, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=1, rope_parameters=_YARN,
    ),
    ("deepseek_v3", "ungrouped"): dict(
        _MLA, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False,
        first_k_dense_replace=0,
    ),
    # 16 experts over 3 layers for the offloading tests.
    ("deepseek_v2", "wide"): dict(_MLA, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=1,
                                  num_hidden_layers=3, n_routed_experts=16, moe_intermediate_size=16),
    ("deepseek_v3", "wide"): dict(_MLA, q_lora_rank=16, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, first_k_dense_replace=1, num_hidden_layers=3,
                                  n_routed_experts=32, moe_intermediate_size=16, num_experts_per_tok=3),
}  # fmt: skip

_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}


def tiny_hf_model(family: str, variant: str = "base", seed=0) -> transformers.PreTrainedModel:
    """A random fp32 model in eval mode with eager attention (the reference for parity)."""
    if (family, variant) not in _VARIANT_KWARGS:
        raise ValueError(f"unknown tiny model {family!r}/{variant!r}; known: {sorted(_VARIANT_KWARGS)}")
    config_name, model_name = _CLASSES[family]
    config = getattr(transformers, config_name)(
        **{**_COMMON, **_VARIANT_KWARGS[family, variant]}, architectures=[model_name], dtype="float32"
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # V3's correction bias starts at zero; random, it changes some choices
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    if family == "gpt_oss":
        _exercise_gpt_oss(model)
    return model


def _exercise_gpt_oss(model) -> None:
    """transformers initialises expert biases to zero and gate_up small enough that the clamp
    never acts: random biases and a wider gate_up make both count."""
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.mul_(3.0)
            experts.gate_up_proj_bias.normal_(0.0, 0.5)
            experts.down_proj_bias.normal_(0.0, 0.5)


EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def fuse_experts(path: Path) -> None:
    """Rewrite a per-expert model.safetensors in the fused layout (transformers 5's in-memory one)."""
    file = path / "model.safetensors"
    out, parts = {}, {}
    for name, value in load_file(file).items():
        if m := EXPERT.fullmatch(name):
            parts.setdefault(int(m[1]), {}).setdefault(PART[m[3]], {})[int(m[2])] = value
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
    assert parts, "no per-expert tensors to fuse"
    for layer, p in parts.items():
        experts = sorted(p["gate"])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([p["gate"][e], p["up"][e]], axis=0) for e in experts]
        )  # [E, 2I, D]
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack([p["down"][e] for e in experts])  # [E, D, I]
    save_file(out, file, metadata={"format": "pt"})


def write_mxfp4(model, path: Path) -> None:
    """Save a tiny gpt-oss model as its released checkpoints are: experts as MXFP4 blocks and
    scales (quantized here, jaxmoe/quant/mxfp4.py), a quantization_config saying so."""
    import json

    from jaxmoe.quant import mxfp4

    model.save_pretrained(path)
    file = path / "model.safetensors"
    out = {}
    for name, value in load_file(file).items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = value
            continue
        parts = [mxfp4.to_hf(**mxfp4.quantize(w.astype(np.float32))) for w in value]  # per expert [K, N]
        out[f"{name}_blocks"] = np.stack([b for b, _ in parts])
        out[f"{name}_scales"] = np.stack([s for _, s in parts])
    save_file(out, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
