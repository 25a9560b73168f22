"""RoPE frequencies from a Hugging Face `rope_parameters` dict, computed as transformers
computes them (fp32, the same order of operations), so positions rotate identically.

`rope_frequencies(head_dim, params)` -> (inv_freq [Dh/2] float32, attention_scaling):
cos and sin are multiplied by `attention_scaling` (YaRN's mscale) before they are cast
to the activation dtype. Supported `rope_type`s: "default" and "yarn".
"""

from __future__ import annotations

import math

import numpy as np

from jaxmoe.config import ConfigError

ROPE_TYPES = ("default", "yarn")


def check_rope(params: dict) -> None:
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_parameters.rope_type={kind!r} is not supported (one of {ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("rope_parameters.partial_rotary_factor is not supported (only 1.0)")
    if kind == "yarn" and params.get("factor") is None:
        raise ConfigError("rope_parameters.factor is required for rope_type 'yarn'")


def _base_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta ** (2i / Dh) in float32, the exponent rounded to float32 as transformers rounds it.
    The power is taken in float64 and rounded once: torch's vectorised fp32 pow is within an
    ulp of that, not bit-equal, so frequencies can differ from transformers' by one ulp."""
    exponent = (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float64)
    return (np.float64(theta) ** exponent).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(head_dim: int, theta: float, params: dict) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim / 2] float32, attention_scaling) for `params` (rope_parameters)."""
    check_rope(params)
    pos_freqs = _base_frequencies(head_dim, theta)
    if params.get("rope_type", "default") == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    factor = float(params["factor"])
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    original = params["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` turns into the original context.
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1) - ramp).astype(np.float32)  # 1: keep the original frequency
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (np.float32(1) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def config_frequencies(cfg) -> tuple[np.ndarray, float]:
    """rope_frequencies for an MoEConfig (its `rope_scaling` pairs, or plain RoPE)."""
    return rope_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling) or {"rope_type": "default"})
