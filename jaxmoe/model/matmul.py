"""How the model multiplies: every product accumulates in fp32 and is rounded once to its
inputs' dtype, as torch's bf16 matmul rounds.

The fp32 accumulator is also what lets a GPU read a decode step's weights once. XLA computes a
product with one row (every projection and expert of a decode step) as a reduction. With a bf16
result it multiplies in bf16 and writes the whole elementwise product (the size of the weight)
before reducing it; with an fp32 one the product fuses into the reduction, which reads each
weight in place (deviceless H100 compile of a [1, 2048] x [2048, 2048] product: two kernels and
8 MiB of temporaries against one kernel and none). For fp32 models both are the same call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_fp32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs) -> jax.Array:
    """`lax.dot_general` in fp32 accumulation, the result in the operands' dtype: an
    `nnx.Linear`'s `dot_general` (its `preferred_element_type` is ignored)."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32, **kwargs)  # fmt: skip
    return out.astype(jnp.result_type(lhs, rhs))


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in fp32 accumulation, the result in the operands' dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.result_type(a, b))
