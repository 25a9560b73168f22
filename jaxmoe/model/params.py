"""Between pure parameter dicts (what checkpoints hold) and the NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.model.decoder import MoEDecoder


def abstract_model(cfg: MoEConfig) -> MoEDecoder:
    """The module with ShapeDtypeStructs for weights: allocates nothing."""
    return nnx.eval_shape(lambda: MoEDecoder(cfg, nnx.Rngs(0)))


def dense_shapes(cfg: MoEConfig) -> dict:
    """The dense pure dict as ShapeDtypeStructs (a restore target)."""
    return nnx.state(abstract_model(cfg)).to_pure_dict()


def build_model(cfg: MoEConfig, dense: dict) -> MoEDecoder:
    """Fill the module from a dense pure dict (numpy or jax arrays)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dense))
    return nnx.merge(graphdef, state)


def check_model_dtype(cfg: MoEConfig, model: MoEDecoder) -> None:
    """An engine's config and its module must agree on the dtype: the module's layers keep
    their compute dtype as static attributes, so a module whose weights were only cast
    still computes in its old one, and the engine's programs (built from `cfg`) would not."""
    if jnp.dtype(model.cfg.dtype) != jnp.dtype(cfg.dtype):
        raise ValueError(f"config dtype {cfg.dtype} but the model was built for {model.cfg.dtype}: "
                         "rebuild it with jaxmoe.model.cast_model(config, model)")


def cast_floats(tree, dtype):
    """Every floating-point leaf of `tree` in `dtype`. jnp.issubdtype, not dtype.kind == "f":
    numpy does not call bfloat16 a float kind."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def cast_model(cfg: MoEConfig, model: MoEDecoder) -> MoEDecoder:
    """`model` rebuilt for `cfg` (its dtype), its weights cast: merging cast weights into the
    old module would keep its layers computing in the old dtype."""
    return build_model(cfg, cast_floats(dense_dict(model), cfg.dtype))


def dense_dict(model: MoEDecoder) -> dict:
    return nnx.state(model).to_pure_dict()
