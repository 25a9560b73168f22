"""Next-layer expert scorers for prefetching, run inside the attend-route program.

A scorer maps layer l's router input to logits over the experts of the next MoE
layer. It runs in the same jitted call as layer l's attention and routing (no
extra dispatch) and its top picks come back in the same host read as the routing
ids. Weights travel as a flat tuple of arrays, the layer as a traced int32, so one
compiled program serves every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.model import MoEDecoder
from jaxmoe.offload.policy import next_moe_layers


class NextLayerScorer:
    name = "scorer"
    leaves: tuple[jax.Array, ...] = ()

    def score(self, leaves: tuple, h: jax.Array, layer: jax.Array) -> jax.Array:
        """h [N, D] at `layer` -> logits [N, E] for the next MoE layer."""
        raise NotImplementedError


class GateAhead(NextLayerScorer):
    """The next MoE layer's own router applied to this layer's router input: needs no
    training (AdapMoE / Pre-gated MoE). Row l of the table is the router of the MoE
    layer after l; zeros where there is none."""

    name = "gate-ahead"

    def __init__(self, model: MoEDecoder):
        cfg = model.cfg
        table = jnp.zeros((cfg.num_layers, cfg.hidden_size, cfg.num_experts), cfg.dtype)
        for layer, nxt in next_moe_layers(cfg.moe_layer_ids).items():
            if nxt is not None:
                table = table.at[layer].set(model.layers[nxt].mlp.gate.kernel[...])
        self.leaves = (table,)

    def score(self, leaves, h, layer):
        return h @ leaves[0][layer]


class ModuleScorer(NextLayerScorer):
    """Any NNX module called as `module(h [N, D], layer) -> logits [N, E]`, such as the
    trained MLP of jaxmoe.predictor."""

    name = "mlp"

    def __init__(self, module):
        self.graphdef, state = nnx.split(module)
        leaves, self.treedef = jax.tree.flatten(state)
        self.leaves = tuple(leaves)

    def score(self, leaves, h, layer):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))(h, layer)
