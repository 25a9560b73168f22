"""RoPE: frequencies (plain, or YaRN as transformers' `_compute_yarn_parameters` computes
them: fp32 throughout, the same order of operations), cos/sin tables and the two layouts
of rotated dimensions.

Shapes: B batch, T tokens, Dr rotated dims (even; the head dim, or MLA's qk_rope_head_dim),
F frequencies (Dr / 2).

cos and sin are multiplied by YaRN's `attention_factor` (1 for plain RoPE) in fp32, before
the cast to the activation dtype, as transformers does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import YarnRope


def _correction_dim(rotations: float, dim: int, theta: float, max_positions: int) -> float:
    """The dimension whose wavelength completes `rotations` turns over `max_positions`."""
    return (dim * math.log(max_positions / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def inv_freq(dim: int, theta: float, yarn: YarnRope | None) -> np.ndarray:
    """[F] fp32 inverse frequencies: plain RoPE, or YaRN's blend of interpolated (long
    wavelengths) and extrapolated (short ones) frequencies with a linear ramp between.

    Host constants in numpy, each fp32 operation rounded as torch rounds it: XLA's fp32
    arithmetic on the same expression (its pow, a division by a constant) lands up to 7 ulps
    away. The power is taken in float64 and rounded once; torch's vectorised fp32 pow is
    within an ulp of that, not always equal."""
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    pos_freqs = (np.float64(theta) ** exponent).astype(np.float32)
    extrapolation = np.float32(1) / pos_freqs
    if yarn is None:
        return extrapolation
    interpolation = np.float32(1) / (np.float32(yarn.factor) * pos_freqs)
    original = yarn.original_max_position_embeddings
    low = _correction_dim(yarn.beta_fast, dim, theta, original)
    high = _correction_dim(yarn.beta_slow, dim, theta, original)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = np.float32(1) - ramp
    blend = interpolation * (np.float32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    return blend.astype(np.float32)


def rope_cos_sin(positions: jax.Array, dim: int, theta: float, yarn: YarnRope | None, dtype,
                 pairs: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """cos, sin for absolute positions [B, T]: [B, T, 1, Dr] for `apply_rope` (halves), or
    [B, T, 1, F] for `apply_rope_pairs`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(dim, theta, yarn))  # [B, T, F]
    if not pairs:
        freqs = jnp.concatenate([freqs, freqs], axis=-1)
    scale = yarn.attention_factor if yarn else 1.0
    cos, sin = jnp.cos(freqs) * scale, jnp.sin(freqs) * scale
    return cos[:, :, None].astype(dtype), sin[:, :, None].astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on halves: dimension i pairs with i + Dr/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ..., each pair one frequency; the result is
    laid out [rotated evens, rotated odds] (transformers' DeepSeek-V3 layout; V2's complex
    form keeps the pairs together). Queries and keys share the layout, so their dot products
    agree."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
