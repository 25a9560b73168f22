"""Two 4-bit codes to a byte: the packing int4 and MXFP4 experts share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[K, N] integers in 0..15 -> [K/2, N] uint8, row 2k in the low nibble, 2k + 1 in the high."""
    v = values.astype(np.uint8)
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """[..., K/2, N] uint8 -> [..., K, N] uint8 (the inverse of pack_nibbles)."""
    low, high = packed & 0xF, packed >> 4
    both = jnp.stack([low, high], axis=-2)  # [..., K/2, 2, N]
    return both.reshape(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))
