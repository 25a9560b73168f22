"""A Hugging Face `config.json` -> MoEConfig, for every supported family: Mixtral, OLMoE and
Qwen-MoE here, DeepSeek-V2/V3 and gpt-oss in modules of their own."""

from __future__ import annotations

import json
from pathlib import Path

from jaxmoe.config.deepseek import deepseek_config
from jaxmoe.config.gpt_oss import gpt_oss_config
from jaxmoe.config.moe_config import ARCHITECTURES, DEEPSEEK, ConfigError, MoEConfig, _rope_theta, hf_dtype


def _check_no_sliding_window(hf: dict, family: str) -> None:
    max_pos = hf.get("max_position_embeddings", 4096)
    if family in ("qwen2_moe", "qwen3_moe"):
        if hf.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (set it to false)")
        return
    window = hf.get("sliding_window")
    if window is not None and window < max_pos:
        raise ConfigError(
            f"sliding_window={window} is smaller than max_position_embeddings={max_pos}; "
            "sliding-window attention is not supported"
        )


def _num_experts(hf: dict) -> int:
    # transformers 5 writes `num_local_experts` for some families; released configs say `num_experts`.
    if "num_experts" in hf:
        return hf["num_experts"]
    return hf["num_local_experts"]


def from_hf_dict(hf: dict, source: str = "config.json") -> MoEConfig:
    """Translate a Hugging Face config dict; every unsupported option raises, naming its field."""
    try:
        return _from_hf_dict(hf)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None


def _from_hf_dict(hf: dict) -> MoEConfig:
    if "GptOssForCausalLM" in (hf.get("architectures") or []):
        return gpt_oss_config(hf)
    if hf.get("quantization_config") is not None:
        method = hf["quantization_config"].get("quant_method", "unknown")
        raise ConfigError(
            f"quantization_config (quant_method={method!r}) is not supported: jaxmoe runs bf16/fp16/fp32 "
            "weights only; convert from an unquantised checkpoint"
        )
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ConfigError(f"architectures={archs} is not supported; expected one of {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[known[0]]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    _check_no_sliding_window(hf, family)

    num_layers = hf["num_hidden_layers"]
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    common = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf, ("yarn",) if family in DEEPSEEK else ()),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        top_k=hf["num_experts_per_tok"],
        dtype=hf_dtype(hf),
    )
    if family in DEEPSEEK:
        return deepseek_config(hf, family, common)
    if family == "mixtral":
        return MoEConfig(
            **common,
            num_experts=hf["num_local_experts"],
            expert_intermediate_size=hf["intermediate_size"],
            moe_layers=(True,) * num_layers,
            norm_topk_prob=True,
            router_weights_fp32=True,
        )
    if family == "olmoe":
        if common["head_dim"] * heads != hidden:
            raise ConfigError(f"head_dim={common['head_dim']} must equal hidden_size / num_attention_heads for OLMoE")
        bias = bool(hf.get("attention_bias", False))
        return MoEConfig(
            **common,
            num_experts=_num_experts(hf),
            expert_intermediate_size=hf["intermediate_size"],
            moe_layers=(True,) * num_layers,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=hf.get("clip_qkv"),
        )
    # Qwen2-MoE and Qwen3-MoE place dense MLP layers the same way.
    only_dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    experts = _num_experts(hf)
    moe_layers = tuple(i not in only_dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
    if family == "qwen2_moe":
        return MoEConfig(
            **common,
            num_experts=experts,
            expert_intermediate_size=hf["moe_intermediate_size"],
            moe_layers=moe_layers,
            dense_intermediate_size=hf["intermediate_size"],
            shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
        )
    bias = bool(hf.get("attention_bias", False))
    return MoEConfig(
        **common,
        num_experts=experts,
        expert_intermediate_size=hf["moe_intermediate_size"],
        moe_layers=moe_layers,
        dense_intermediate_size=hf.get("intermediate_size", 0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="per_head",
    )


def load_hf_config(path: str | Path) -> MoEConfig:
    """Read `config.json` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(hf, source=str(path))
