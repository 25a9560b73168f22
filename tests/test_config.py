"""Config translation, real-size shapes (abstract, nothing allocated) and unsupported options."""

from __future__ import annotations

import jax
import pytest

from jaxmoe.checkpoint.convert import count_params
from jaxmoe.checkpoint.hf_keys import dense_targets
from jaxmoe.config import ConfigError, from_hf_dict
from jaxmoe.model import dense_shapes
from real_configs import MIXTRAL_8X7B, OLMOE_1B_7B, QWEN3_30B_A3B, QWEN15_MOE_A27B

# Published totals: OLMoE-1B-7B 6.92B, Qwen3-30B-A3B 30.5B, Mixtral-8x7B 46.7B, Qwen1.5-MoE-A2.7B 14.3B.
REAL = [(OLMOE_1B_7B, 6.92e9), (QWEN3_30B_A3B, 30.5e9), (MIXTRAL_8X7B, 46.7e9), (QWEN15_MOE_A27B, 14.3e9)]


@pytest.mark.parametrize("hf,total", REAL, ids=lambda x: x["architectures"][0] if isinstance(x, dict) else "")
def test_real_shapes_and_parameter_counts(hf, total):
    cfg = from_hf_dict(hf)
    assert count_params(cfg) == pytest.approx(total, rel=0.005)
    # Every tensor the weight map expects lands on a parameter of the same (transposed) shape.
    shapes = dense_shapes(cfg)
    targets = dense_targets(cfg)
    leaves = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert len(targets) == len(leaves)
    for name, t in targets.items():
        leaf = shapes
        for key in t.path:
            leaf = leaf[key]
        want = t.shape[::-1] if t.transpose else t.shape
        assert tuple(leaf.shape) == tuple(want), name


def test_family_specific_fields():
    olmoe = from_hf_dict(OLMOE_1B_7B)
    assert (olmoe.family, olmoe.qk_norm, olmoe.head_dim, olmoe.norm_topk_prob) == ("olmoe", "full", 128, False)
    qwen3 = from_hf_dict(QWEN3_30B_A3B)
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.num_kv_heads, qwen3.expert_intermediate_size) == ("per_head", 128, 4, 768)
    mixtral = from_hf_dict(MIXTRAL_8X7B)
    assert mixtral.router_weights_fp32 and mixtral.norm_topk_prob and mixtral.rope_theta == 1e6
    qwen2 = from_hf_dict(QWEN15_MOE_A27B)
    assert qwen2.shared_expert_intermediate_size == 5632 and qwen2.qkv_bias
    sparse = from_hf_dict({**QWEN15_MOE_A27B, "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert sparse.moe_layers == (False, True, False, False)


def test_rope_parameters_form_is_read():
    cfg = from_hf_dict({**MIXTRAL_8X7B, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5


@pytest.mark.parametrize(
    "change,field",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"quantization_config": {"quant_method": "mxfp4"}}, "not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"torch_dtype": "int8"}, "dtype"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ],
)
def test_unsupported_options_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        from_hf_dict({**MIXTRAL_8X7B, **change})


def test_qwen_sliding_window_flag_is_refused():
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_dict({**QWEN3_30B_A3B, "use_sliding_window": True})
    # A window that is switched off does not matter.
    assert from_hf_dict({**QWEN15_MOE_A27B, "sliding_window": 4096}).num_layers == 24


def test_missing_field_is_named():
    hf = dict(OLMOE_1B_7B)
    del hf["num_experts"]
    with pytest.raises(ConfigError, match="num_local_experts|num_experts"):
        from_hf_dict(hf)
