"""gpt-oss's config.json as an MoEConfig: its differences from the other families are
fields (sliding layers, sinks, YaRN, biases, the clamped SwiGLU, top-k-then-softmax
routing), so no model code asks which family it runs.

Checkpoints whose experts ship in MXFP4 (`quantization_config.quant_method == "mxfp4"`)
are read here like bf16 ones: the expert format is the converter's business
(jaxmoe/checkpoint/mxfp4_experts.py), not the model's.
"""

from __future__ import annotations

from jaxmoe.config.moe_config import ConfigError, MoEConfig, hf_dtype, resolve_yarn, rope_params

LAYER_TYPES = ("sliding_attention", "full_attention")
# Options of `quantization_config` that do not change how the stored experts read.
MXFP4_KEYS = {"quant_method", "modules_to_not_convert", "dequantize", "_is_quantized", "_pre_quantized"}


def _check_quantization(hf: dict) -> None:
    q = hf.get("quantization_config")
    if q is None:
        return
    if q.get("quant_method") != "mxfp4":
        raise ConfigError(f"quantization_config.quant_method={q.get('quant_method')!r} is not supported "
                          "for gpt-oss (only 'mxfp4' experts, or none)")  # fmt: skip
    unknown = sorted(set(q) - MXFP4_KEYS)
    if unknown:
        raise ConfigError(f"quantization_config.{unknown[0]} is not supported")


def gpt_oss_config(hf: dict) -> MoEConfig:
    _check_quantization(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (gpt-oss uses its clamped SwiGLU)")
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise ConfigError(f"layer_types entry {bad[0]!r} is not supported (expected one of {LAYER_TYPES})")
    sliding = tuple(t == "sliding_attention" for t in types)
    window = hf.get("sliding_window") or 0
    if any(sliding) and window < 1:
        raise ConfigError("sliding_window must be set when layer_types has sliding_attention layers")
    max_positions = hf.get("max_position_embeddings", 131072)
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", True))
    return MoEConfig(
        family="gpt_oss",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_experts=hf.get("num_local_experts", hf.get("num_experts")),
        top_k=hf["num_experts_per_tok"],
        expert_intermediate_size=hf["intermediate_size"],
        moe_layers=(True,) * layers,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_params(hf).get("rope_theta") or hf.get("rope_theta") or 150000.0),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=hf_dtype(hf),
        qkv_bias=bias,
        o_bias=bias,
        sliding_layers=sliding if any(sliding) else (),
        sliding_window=window if any(sliding) else 0,
        attention_sinks=True,
        rope_yarn=resolve_yarn(hf, max_positions),
        router_scoring="topk_softmax",
        router_bias=True,
        expert_bias=True,
        expert_act="clamped_swiglu",
        norm_topk_prob=False,
        norm_scale_fp32=True,
        # transformers' GptOssExperts fixes alpha at 1.702 and the limit at 7.0 (the released
        # configs' `swiglu_limit`); a config that says another limit is refused, not ignored.
        swiglu_limit=_swiglu_limit(hf),
    )


def _swiglu_limit(hf: dict) -> float:
    limit = float(hf.get("swiglu_limit", 7.0))
    if limit != 7.0:
        raise ConfigError(f"swiglu_limit={limit} is not supported (transformers computes with 7.0)")
    return limit
