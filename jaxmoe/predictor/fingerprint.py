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


def model_hash(cfg: MoEConfig) -> str:
    """16 hex digits of sha256 over the config's fields (sorted JSON)."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=list)
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
