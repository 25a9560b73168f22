"""The models the benchmark runs: named shapes (Hugging Face config fields) and checkpoint directories.

Where the weights come from (`source`):
- "hf": built by transformers from the config and a torch seed; jaxmoe's parameters
  are assembled from that model's state dict, so jaxmoe and the peers run the same
  weights and their greedy tokens are compared. Only for shapes whose torch model
  fits the device at once.
- "random": seeded random jaxmoe weights generated on the fly (dense weights on the
  device, experts straight into pinned host memory, one expert at a time; nothing
  written to disk). For shapes too big to build through a torch model and a state
  dict. Peers are built by transformers from the same config and seed, but torch's
  random stream is not jax's: their weights differ, so tokens are not compared.
- "checkpoint": a converted jaxmoe checkpoint directory (`--model DIR`, and the
  shipped default model). No peers (transformers would need `scripts/export_hf.py`).

Pure data plus config translation: nothing here allocates an array.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "jaxmoe-tiny"

_OLMOE = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "max_position_embeddings": 4096}
_QWEN3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 1,
          "mlp_only_layers": [], "norm_topk_prob": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "use_sliding_window": False}  # fmt: skip
_MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "rope_theta": 1e6,
            "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False}  # fmt: skip

_GPT_OSS = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "attention_bias": True,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "swiglu_limit": 7.0, "rope_parameters": {
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}}  # fmt: skip
# Hugging Face config fields. The full-size ones are the released models' shapes.
SHAPES = {
    "olmoe-small": _OLMOE | dict(
        vocab_size=1024, hidden_size=256, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
    ),
    "olmoe-1b-7b": _OLMOE | dict(  # allenai/OLMoE-1B-7B: 6.92 B params
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    ),
    "qwen3-tiny": _QWEN3 | dict(  # the random-weight path at test size
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096,
    ),
    # One tiny model per family for the GPU check's exactness step: 16 experts over 3-4 layers give
    # the cache something to evict at half the experts; each family's own options are on.
    "mixtral-tiny16": _MIXTRAL | dict(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=4096,
    ),
    "olmoe-tiny16": _OLMOE | dict(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_experts=16, num_experts_per_tok=2, clip_qkv=0.5, norm_topk_prob=True,
    ),
    "qwen2-moe-tiny16": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]} | dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=16, num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=False,
        qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
        max_position_embeddings=4096,
    ),
    "qwen3-moe-tiny16": _QWEN3 | dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=16, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=4096,
    ),
    "gpt-oss-tiny16": _GPT_OSS | dict(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=4096,
    ),
    "gpt-oss-20b": _GPT_OSS | dict(  # openai/gpt-oss-20b: 20.9 B params (experts ship in MXFP4)
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
    ),
    "qwen3-30b-a3b": _QWEN3 | dict(  # Qwen/Qwen3-30B-A3B: 30.5 B params
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=40960,
    ),
    "mixtral-8x7b": _MIXTRAL | dict(  # mistralai/Mixtral-8x7B-v0.1: 46.7 B params
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7 B params; MLA with a full-rank query, YaRN to 160k,
    # one dense first layer, 2 shared + 64 routed experts (top-6, greedy softmax).
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"]} | dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        scoring_func="softmax", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        tie_word_embeddings=False,
    ),
}  # fmt: skip
SOURCE = {"olmoe-small": "hf", "olmoe-1b-7b": "hf"}  # the rest: "random"
# Random weights route almost every token to the same experts (a decode hit rate of 0.99 where
# a trained model gets 0.2-0.6): each layer's output, shared by every token, drowns the small
# random embedding in the residual stream the routers see. Scaled embeddings let token identity
# reach the routers. Decoded greedily, a deep random model still falls into a loop (8 layers at
# x28: two distinct tokens, hit rate 0.985), so rows on scaled weights are sampled. Sampled at
# T = 1, the scale that matches the shipped model's lru decode hit rate at 20% of the experts
# (0.26) grows with depth: x28 at 4 layers (0.24), x40 at 8 (0.26, where x28 gave 0.49). The
# 16-layer shape was not measured (too big for the CPU machine): its rows report their own
# hit rate (docs/BENCHMARKS.md, "Routing for the GPU rows").
ROUTED_EMBED_SCALE = 40.0
# Total device budgets (GiB) of the GPU matrix: each gives an `auto` expert budget and
# the accelerate peer's max_memory.
GPU_DEVICE_BUDGETS_GIB = {"olmoe-1b-7b": (5, 8, 16), "qwen3-30b-a3b": (16, 24, 40), "mixtral-8x7b": (24,)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # a SHAPES key, or the checkpoint directory's name
    source: str  # "hf" | "random" | "checkpoint"
    path: str | None = None  # checkpoint directory
    expert_format: str = "dense"  # how the experts are held (a checkpoint: its own, see fmt())
    embed_scale: float = 1.0  # "random": token embeddings x this (ROUTED_EMBED_SCALE: see above)

    def __post_init__(self):
        if self.embed_scale != 1.0 and self.source != "random":
            raise ValueError(f"model {self.name!r}: an embedding scale applies to random weights only, "
                             f"not to {self.source!r} weights")  # fmt: skip

    def fmt(self):
        """The ExpertFormat of the routed experts."""
        if self.source == "checkpoint":
            from jaxmoe.checkpoint.expert_format import read_format

            return read_format(self.path)
        from jaxmoe.quant import parse_format

        return parse_format(self.expert_format)

    @property
    def layout(self) -> str:
        """The name, with the expert format when it is not dense: what sets the bytes a row moves."""
        fmt = self.fmt().name
        return self.name if fmt == "dense" else f"{self.name}/{fmt}"

    @property
    def label(self) -> str:
        """The layout, with the embedding scale when it is not 1: what tells one set of weights from another."""
        return self.layout if self.embed_scale == 1.0 else f"{self.layout}/embed-x{self.embed_scale:g}"

    @property
    def routing(self) -> str:
        """How a random model's tokens pick experts (the hit rate a cache can reach depends on it)."""
        if self.source != "random":
            return "trained" if self.source == "checkpoint" else "random weights"
        return "random weights" if self.embed_scale == 1.0 else f"random weights, embeddings x{self.embed_scale:g}"

    def hf_fields(self, dtype: str) -> dict:
        """The config.json dict of this model in `dtype` (a checkpoint keeps its own dtype)."""
        if self.source == "checkpoint":
            import json

            return json.loads((Path(self.path) / "config.json").read_text())
        return SHAPES[self.name] | {"dtype": dtype, "eos_token_id": None, "pad_token_id": 0, "bos_token_id": None}

    def config(self, dtype: str):
        """jaxmoe's MoEConfig."""
        from jaxmoe.config import from_hf_dict

        return from_hf_dict(self.hf_fields(dtype), source=self.name)

    def dtypes(self, wanted: list[str]) -> list[str]:
        return [self.config("bfloat16").dtype] if self.source == "checkpoint" else wanted

    @property
    def predictor(self) -> str:
        """What the predictor policy uses: a shipped trained predictor, else the next layer's router."""
        trained = self.path and Path(self.path) / "predictor"
        return str(trained) if trained and (trained / "predictor.json").is_file() else "gate-ahead"

    @property
    def has_peers(self) -> bool:
        return self.source != "checkpoint"

    @property
    def same_weights_as_peers(self) -> bool:
        return self.source == "hf"


def resolve(text: str) -> ModelSpec:
    """A shape name, `jaxmoe-tiny` (the shipped default model), or a checkpoint directory."""
    if text in SHAPES:
        return ModelSpec(text, SOURCE.get(text, "random"))
    path = DEFAULT_CHECKPOINT if text == DEFAULT_CHECKPOINT.name else Path(text)
    if not (path / "config.json").is_file():
        raise ValueError(f"model {text!r}: not one of {sorted(SHAPES)} nor a checkpoint directory with config.json")
    return ModelSpec(path.name, "checkpoint", str(path.resolve()))
