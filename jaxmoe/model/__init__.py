"""The MoE decoder (Flax NNX dense parts) and the pure routed-expert functions."""

from jaxmoe.model.decoder import MoEDecoder, init_experts
from jaxmoe.model.kv import LatentKV, LayerCache, LayerKV, LayerSlot, init_kv_cache, kv_layout, layer_slot, with_slot
from jaxmoe.model.window import RingKV
from jaxmoe.model.experts import (
    ExpertWeights,
    PackedExperts,
    Routing,
    combine,
    expert_rows,
    moe_ffn,
    moe_ffn_reference,
    num_unique_experts,
    route,
)
from jaxmoe.model.params import (
    abstract_model,
    build_model,
    cast_floats,
    cast_model,
    check_model_dtype,
    dense_dict,
    dense_shapes,
)

__all__ = [
    "ExpertWeights",
    "LatentKV",
    "LayerCache",
    "LayerKV",
    "LayerSlot",
    "MoEDecoder",
    "PackedExperts",
    "RingKV",
    "Routing",
    "abstract_model",
    "combine",
    "expert_rows",
    "build_model",
    "cast_floats",
    "cast_model",
    "check_model_dtype",
    "dense_dict",
    "dense_shapes",
    "init_experts",
    "init_kv_cache",
    "kv_layout",
    "layer_slot",
    "moe_ffn",
    "moe_ffn_reference",
    "num_unique_experts",
    "route",
    "with_slot",
]
