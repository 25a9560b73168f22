"""The frozen model configuration, and what every family's translation from a Hugging Face
`config.json` shares (RoPE and YaRN parameters, the dtype).

One dataclass covers every supported family; the differences between them
are spelled out as fields (qk-norm kind, shared expert, router weight dtype)
rather than as branches on the family name inside model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
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
    # MLA multiplies its softmax scale by this twice (mscale(factor, mscale_all_dim); 1 without it).
    softmax_mscale: float = 1.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    family: Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
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
    # Per layer: True where attention sees the last `sliding_window` tokens only (gpt-oss; its
    # KV cache is a ring of that many slots, jaxmoe/model/window.py); () for none.
    sliding_layers: tuple[bool, ...] = ()
    sliding_window: int = 0
    attention_sinks: bool = False  # a learned per-head logit that takes part in the softmax
    rope_interleaved: bool = False  # rotate adjacent pairs (x0, x1), (x2, x3) rather than halves
    rope_yarn: YarnRope | None = None  # None: plain RoPE (jaxmoe/model/rope.py)
    # Routing beyond a softmax top-k (jaxmoe/model/experts.py `route`). "topk_softmax" (gpt-oss):
    # top-k of the logits, then a softmax over the k chosen, in the logits' dtype.
    router_scoring: Literal["softmax", "sigmoid", "topk_softmax"] = "softmax"
    router_bias: bool = False
    router_logits_fp32: bool = False  # the router's input and weight cast to fp32 before the matmul
    router_correction_bias: bool = False  # a per-expert bias added to the scores for choosing only
    router_groups: int = 1  # experts split in groups; the top router_topk_groups groups are kept
    router_topk_groups: int = 1
    router_group_score: Literal["max", "top2_sum"] = "max"  # how a group is scored from its experts
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE gates its shared expert; DeepSeek's are ungated
    expert_bias: bool = False  # a bias per expert on gate_up [2I] and on down [D]
    # "silu": silu(gate) * up. "clamped_swiglu": gpt-oss's, gate clamped above and up on both
    # sides at `swiglu_limit`, gate * sigmoid(alpha * gate) * (up + 1).
    expert_act: Literal["silu", "clamped_swiglu"] = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # RMSNorm scales the fp32 normalised value and then casts (gpt-oss), instead of casting
    # first and scaling in the activation dtype.
    norm_scale_fp32: bool = False

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
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if any(self.sliding_layers) and self.sliding_window < 1:
            raise ConfigError(f"sliding_window={self.sliding_window} must be at least 1 with sliding layers")
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

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def kv_length(self, layer: int, length: int) -> int:
        """Key slots layer `layer` keeps for a context of `length`: a sliding layer needs
        only its window (a ring; jaxmoe/model/window.py)."""
        return min(length, self.sliding_window) if self.is_sliding(layer) else length

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
        rope_type = _rope_type(params)
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default' RoPE)")
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if scaling is not None:
        rope_type = _rope_type(scaling)
        if rope_type != "default":
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'default' RoPE)")
    return float(hf.get("rope_theta", 10000.0))


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_params(hf: dict) -> dict:
    """`rope_parameters` (transformers 5) or the older `rope_scaling`; {} for neither."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def resolve_yarn(hf: dict, max_positions: int) -> YarnRope | None:
    """A config's RoPE scaling as a YarnRope, defaults and derived factors filled in as
    transformers' `standardize_rope_params` and `_compute_yarn_parameters` fill them; None for
    plain RoPE. `max_positions`: max_position_embeddings (the family's default filled in)."""
    params = rope_params(hf)
    kind = _rope_type(params)
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"rope_parameters.rope_type={kind!r} is not supported (only 'default' and 'yarn')")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("rope_parameters.partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    # DeepSeek's attention scales its softmax by mscale_all_dim alone (transformers' yarn_apply_mscale).
    softmax = _mscale(factor, mscale_all_dim) if mscale_all_dim else 1.0
    return YarnRope(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
        softmax_mscale=float(softmax),
    )


def hf_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; expected one of {DTYPES}")
    return name
