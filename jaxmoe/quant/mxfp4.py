"""MXFP4 (OCP microscaling FP4): 4-bit e2m1 values, 32 to a block sharing one e8m0
scale (a power of two, exponent bias 127). gpt-oss ships its experts this way.

Layouts, for a matrix w [K, N] (input dimension K first, as jaxmoe holds experts):
  Hugging Face  `*_blocks` [N, K/32, 16] uint8 (row n's values along K, two to a byte,
                the even k in the low nibble) and `*_scales` [N, K/32] uint8
  jaxmoe        "q" [K/2, N] uint8 (int4's nibble layout: row 2k low, 2k + 1 high) and
                "scale" [K/32, N] uint8: the same bytes transposed, nothing rounded
The program unpacks inside the computation (`dequantize`), only for the experts it
computes; the bytes on disk, in host memory and in the device cache stay 4.25 bits a weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.quant.nibbles import pack_nibbles, unpack_nibbles

BLOCK = 32
# e2m1 code -> value; bit 3 is the sign.
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127


def from_hf(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One expert's HF blocks [N, K/32, 16] and scales [N, K/32] -> jaxmoe (q [K/2, N], scale [K/32, N])."""
    n = blocks.shape[0]
    return np.ascontiguousarray(blocks.reshape(n, -1).T), np.ascontiguousarray(scales.T)


def to_hf(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of from_hf."""
    n = q.shape[1]
    return np.ascontiguousarray(q.T).reshape(n, -1, BLOCK // 2), np.ascontiguousarray(scale.T)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Inside a program: q [..., K/2, N], scale [..., K/32, N] uint8 -> [..., K, N] in `dtype`.
    Exact: an e2m1 value times a power of two is representable in bf16 and fp32. The scale
    is built from its exponent bits (2^(s - 127) for s in 1..254; s = 0 reads as zero)."""
    codes = unpack_nibbles(q)  # [..., K, N] in 0..15
    values = jnp.asarray(E2M1)[codes.astype(jnp.int32)]
    pow2 = jax.lax.bitcast_convert_type(scale.astype(jnp.uint32) << 23, jnp.float32)  # [..., K/32, N]
    k, n = values.shape[-2:]
    groups = values.reshape(values.shape[:-2] + (k // BLOCK, BLOCK, n)) * pow2[..., :, None, :]
    return groups.reshape(values.shape).astype(dtype)


def dequantize_np(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Host numpy version of `dequantize` (float32), for tests and export checks."""
    codes = np.stack([q & 0xF, q >> 4], axis=-2).reshape(q.shape[:-2] + (2 * q.shape[-2], q.shape[-1]))
    pow2 = np.ldexp(np.float32(1), scale.astype(np.int32) - SCALE_BIAS).astype(np.float32)
    k, n = codes.shape[-2:]
    values = E2M1[codes].reshape(codes.shape[:-2] + (k // BLOCK, BLOCK, n)) * pow2[..., :, None, :]
    return values.reshape(codes.shape).astype(np.float32)


def quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """w [K, N] float -> {"q": [K/2, N], "scale": [K/32, N]} uint8: per block of 32 along K the
    smallest power of two that puts the block's largest magnitude within e2m1's 6, then each
    value rounded to the nearest e2m1 value (ties to the smaller magnitude)."""
    k, n = w.shape
    g = w.astype(np.float32).reshape(k // BLOCK, BLOCK, n)
    amax = np.max(np.abs(g), axis=1)  # [K/32, N]
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.ceil(np.log2(amax / 6.0)), 0).astype(np.int32)
    exp = np.clip(exp, 1 - SCALE_BIAS, SCALE_BIAS)
    scaled = g / np.ldexp(np.float32(1), exp)[:, None, :]
    magnitudes = E2M1[:8]
    code = np.argmin(np.abs(np.abs(scaled)[..., None] - magnitudes), axis=-1).astype(np.uint8)
    code |= np.where((scaled < 0) & (code > 0), 8, 0).astype(np.uint8)
    return {"q": pack_nibbles(code.reshape(k, n)), "scale": (exp + SCALE_BIAS).astype(np.uint8)}
