"""Frozen model configuration, built from a Hugging Face `config.json`.

One dataclass covers the four supported families; the differences between them
are spelled out as fields (qk-norm kind, shared expert, router weight dtype)
rather than as branches on the family name inside model code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
DTYPES = ("float32", "bfloat16", "float16")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")


class ConfigError(ValueError):
    """A config.json this runtime cannot run exactly; the message names the field."""


@dataclasses.dataclass(frozen=True)
class YarnRope:
    """YaRN RoPE scaling, resolved as transformers resolves `rope_parameters` (rope_type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # multiplies cos and sin
    # DeepSeek's attention multiplies its softmax scale by this twice (mscale(factor, mscale_all_dim)).
    softmax_mscale: float = 1.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    family: Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    # Per layer: True for a routed-expert layer, False for a dense MLP layer.
    moe_layers: tuple[bool, ...]
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True
    # Mixtral keeps the renormalised top-k weights in fp32; the others cast them
    # to the activation dtype before weighting the expert outputs.
    router_weights_fp32: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    # Multi-head latent attention (DeepSeek-V2/V3, `attention="mla"`, jaxmoe/model/mla.py): the
    # KV cache holds each token's normalised latent [kv_lora_rank] and rotated key [qk_rope_head_dim].
    attention: Literal["gqa", "mla"] = "gqa"
    q_lora_rank: int = 0  # 0: queries projected at full rank (q_proj)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleaved: bool = False  # rotate adjacent pairs (x0, x1), (x2, x3) rather than halves
    rope_yarn: YarnRope | None = None
    # Routing beyond a softmax top-k (DeepSeek; jaxmoe/model/experts.py `route`).
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    router_logits_fp32: bool = False  # the router's input and weight cast to fp32 before the matmul
    router_correction_bias: bool = False  # a per-expert bias added to the scores for choosing only
    router_groups: int = 1  # experts split in groups; the top router_topk_groups groups are kept
    router_topk_groups: int = 1
    router_group_score: Literal["max", "top2_sum"] = "max"  # how a group is scored from its experts
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE gates its shared expert; DeepSeek's are ungated

    def __post_init__(self):
        if len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.num_experts % self.router_groups:
            raise ConfigError(f"n_group={self.router_groups} does not divide the {self.num_experts} experts")
        per_group = self.num_experts // self.router_groups
        if not 0 < self.router_topk_groups <= self.router_groups:
            raise ConfigError(f"topk_group={self.router_topk_groups} must be in 1..n_group={self.router_groups}")
        if self.router_groups > 1 and self.top_k > self.router_topk_groups * per_group:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the experts in topk_group="
                              f"{self.router_topk_groups} groups of {per_group}")  # fmt: skip
        if self.router_group_score == "top2_sum" and self.router_groups > 1 and per_group < 2:
            raise ConfigError(f"n_group={self.router_groups} leaves fewer than 2 experts per group to score it")

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rope_theta(hf: dict, scaled: tuple[str, ...] = ()) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the older top-level fields; a
    rope_type in `scaled` is let through (the family's translation reads its parameters)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if _rope_type(params or scaling or {}) in scaled:
        return float((params or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params is not None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default' RoPE)")
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'default' RoPE)")
    return float(hf.get("rope_theta", 10000.0))


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


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


def _torch_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; expected one of {DTYPES}")
    return name


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
        dtype=_torch_dtype(hf),
    )
    if family in DEEPSEEK:
        from jaxmoe.config_deepseek import deepseek_config  # it builds on this module's types

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
