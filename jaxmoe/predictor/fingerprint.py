"""Which model a trace set or predictor belongs to, and which layer predicts which.

`model_hash` covers every MoEConfig field, so a change of shape, family or dtype
changes it; it does not cover the weights (two checkpoints with one config and
different weights hash alike). `router_hash` covers the router weights, recorded
with traces and predictors so a retrained checkpoint of the same shape can be told apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MoEConfig


# MoEConfig's fields when the hash was introduced: always hashed. A field added since joins the
# hash only where it differs from its default, so adding one (a new family's option) leaves
# the hash, and every trace set, predictor and map made for an existing model, unchanged.
_FIRST_FIELDS = frozenset((
    "family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
    "top_k", "expert_intermediate_size", "moe_layers", "dense_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "router_weights_fp32", "qkv_bias", "o_bias", "qk_norm", "clip_qkv", "rms_norm_eps",
    "rope_theta", "max_position_embeddings", "tie_word_embeddings", "dtype",
))  # fmt: skip


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def model_hash(cfg: MoEConfig) -> str:
    """16 hex digits of sha256 over the config's fields (sorted JSON; see _FIRST_FIELDS)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    values = {name: value for name, value in dataclasses.asdict(cfg).items()
              if name in _FIRST_FIELDS or value != _default(fields[name])}  # fmt: skip
    blob = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def router_hash(model, cfg: MoEConfig) -> str:
    """16 hex digits of sha256 over the MoE layers' router kernels (a loaded MoEDecoder)."""
    digest = hashlib.sha256()
    for layer in cfg.moe_layer_ids:
        digest.update(np.asarray(model.layers[layer].mlp.gate.kernel[...], np.float32).tobytes())
    return digest.hexdigest()[:16]


def expert_bytes(cfg: MoEConfig) -> int:
    """Bytes of one routed expert (gate, up, down) in the model's dtype: one transfer."""
    return cfg.expert_params * jnp.dtype(cfg.dtype).itemsize


def layer_pairs(cfg: MoEConfig) -> tuple[tuple[int, int], ...]:
    """(l, next MoE layer after l) for every MoE layer but the last: what a predictor serves."""
    ids = cfg.moe_layer_ids
    return tuple(zip(ids[:-1], ids[1:]))


def model_summary(cfg: MoEConfig) -> dict:
    """The fields a trace set or predictor must agree on with the model it is used with."""
    return {
        "model_hash": model_hash(cfg),
        "moe_layers": list(cfg.moe_layer_ids),
        "num_layers": cfg.num_layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "hidden_size": cfg.hidden_size,
        "expert_bytes": expert_bytes(cfg),
    }
