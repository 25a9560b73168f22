"""RoPE frequencies with YaRN scaling, computed as transformers' `_compute_yarn_parameters`
computes them (fp32 throughout, the same operation order), so long-context models keep
transformers' numbers.

Shapes: Dr rotated dims (even); the result has Dr / 2 frequencies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmoe.config import YarnRope


def _correction_dim(rotations: float, dim: int, theta: float, max_positions: int) -> float:
    """The dimension whose wavelength completes `rotations` turns over `max_positions`."""
    return (dim * math.log(max_positions / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def inv_freq(dim: int, theta: float, yarn: YarnRope | None) -> jax.Array:
    """[Dr / 2] fp32 inverse frequencies: plain RoPE, or YaRN's blend of interpolated (long
    wavelengths) and extrapolated (short ones) frequencies with a linear ramp between."""
    pos_freqs = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if yarn is None:
        return 1.0 / pos_freqs
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)
    original = yarn.original_max_position_embeddings
    low = _correction_dim(yarn.beta_fast, dim, theta, original)
    high = _correction_dim(yarn.beta_slow, dim, theta, original)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
