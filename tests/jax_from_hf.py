"""Build a jaxmoe model straight from an in-memory transformers model (no files)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.checkpoint.assemble import assemble
from jaxmoe.config import from_hf_dict
from jaxmoe.model import build_model


def jaxmoe_from_hf(hf_model, dtype: str = "float32"):
    """(config, MoEDecoder, experts) holding `hf_model`'s weights in `dtype`."""
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    cfg = from_hf_dict({**hf_model.config.to_dict(), "dtype": dtype})
    dense, experts = assemble(cfg, list(state), lambda n: state[n].shape, state.__getitem__, "state_dict")
    return cfg, build_model(cfg, dense), jax.tree.map(jnp.asarray, experts)
