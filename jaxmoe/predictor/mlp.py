"""The next-layer expert predictor: a small MLP over the router input.

Shapes:
  N tokens, D model hidden size, P input dim (D, or a fixed random projection of it),
  W width, E experts, R rows: one per MoE layer that has a next MoE layer.
`layer` is the model's layer index l of the router input; the logits are for the
experts of the next MoE layer after l. Two architectures, same signature:
  embed  one shared MLP; a learned per-row embedding is added to the hidden layer
         and a per-row bias to the output
  heads  every row has its own MLP (parameters stacked on a leading R axis)
A layer with no next MoE layer (the last MoE layer, dense layers) gets zeros.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCHS = ("embed", "heads")


class Const(nnx.Variable):
    """Saved with the predictor, never trained (the input projection)."""


class ExpertPredictor(nnx.Module):
    def __init__(
        self,
        *,
        num_layers: int,
        pairs: Sequence[tuple[int, int]],
        hidden_size: int,
        num_experts: int,
        width: int,
        arch: str = "embed",
        projection: np.ndarray | None = None,
        rngs: nnx.Rngs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r}; choose one of {ARCHS}")
        self.arch, self.pairs = arch, tuple((int(a), int(b)) for a, b in pairs)
        row = [-1] * num_layers
        for r, (layer, _) in enumerate(self.pairs):
            row[layer] = r
        self.row_of_layer = tuple(row)  # static: baked into the compiled program as a constant
        rows, p = len(self.pairs), hidden_size if projection is None else projection.shape[1]
        if projection is not None and projection.shape[0] != hidden_size:
            raise ValueError(f"projection is {projection.shape}, expected ({hidden_size}, P)")
        self.projection = None if projection is None else Const(jnp.asarray(projection, jnp.float32))
        init = nnx.initializers.lecun_normal()
        per_row = (rows,) if arch == "heads" else ()
        self.ln_scale = nnx.Param(jnp.ones(per_row + (p,)))
        self.ln_bias = nnx.Param(jnp.zeros(per_row + (p,)))
        self.w1 = nnx.Param(init(rngs.params(), per_row + (p, width)))
        self.b1 = nnx.Param(jnp.zeros((rows, width)))  # per row in both: the "layer embedding" of `embed`
        self.w2 = nnx.Param(init(rngs.params(), per_row + (width, num_experts)))
        self.b2 = nnx.Param(jnp.zeros((rows, num_experts)))

    def _mlp(self, x, ln_scale, ln_bias, w1, b1, w2, b2):
        """x [..., n, P] with parameters already picked for its row(s)."""
        # RMS scaling, no centring: which experts win is invariant to the input's scale, not to a shift.
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * ln_scale + ln_bias
        return jax.nn.gelu(x @ w1 + b1) @ w2 + b2

    def _inputs(self, h: jax.Array) -> jax.Array:
        h = h.astype(jnp.float32)
        return h if self.projection is None else h @ self.projection[...]

    def __call__(self, h: jax.Array, layer: jax.Array) -> jax.Array:
        """h [N, D] router input at layer `layer` (a traced int32 scalar) -> fp32 logits [N, E]."""
        table = jnp.asarray(self.row_of_layer, jnp.int32)
        r = table[layer]
        i = jnp.maximum(r, 0)
        pick = (lambda v: v[...][i]) if self.arch == "heads" else (lambda v: v[...])
        logits = self._mlp(
            self._inputs(h), pick(self.ln_scale), pick(self.ln_bias), pick(self.w1),
            self.b1[...][i], pick(self.w2), self.b2[...][i],
        )  # fmt: skip
        return jnp.where(r >= 0, logits, 0.0)

    def rows(self, h: jax.Array, projected: bool = False) -> jax.Array:
        """h [R, n, D], row r holding router inputs of layer pairs[r][0] -> logits [R, n, E].

        `projected`: h is already [R, n, P] (traces store projected inputs).
        """
        x = h.astype(jnp.float32) if projected else self._inputs(h)
        if self.arch == "heads":
            lead = lambda v: v[...][:, None]  # noqa: E731  [R, 1, ...] broadcasts over n
            return self._mlp(
                x, lead(self.ln_scale), lead(self.ln_bias), self.w1[...],
                lead(self.b1), self.w2[...], lead(self.b2),
            )  # fmt: skip
        return self._mlp(
            x, self.ln_scale[...], self.ln_bias[...], self.w1[...],
            self.b1[...][:, None], self.w2[...], self.b2[...][:, None],
        )  # fmt: skip


def param_count(model: ExpertPredictor) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
