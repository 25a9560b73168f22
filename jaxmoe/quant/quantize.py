"""Quantizing one expert's matrices on the host (numpy), the inverse of ExpertFormat.unpack.

Round to nearest, the scale first rounded to the storage dtype so that the values are
rounded against the scale the program will multiply by:
  int8  symmetric per output channel: scale = max |w| over the input dimension / 127
  int4  asymmetric per group of `group_size` input rows: scale = (max - min) / 15,
        zero = round(-min / scale) in 0..15, values round(w / scale) + zero in 0..15
`refine_int4` (HQQ-style, optional) then moves each group's zero point to lower the
reconstruction error, alternating with re-rounding the values.
"""

from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp
import numpy as np

from jaxmoe.model import ExpertWeights
from jaxmoe.quant import mxfp4
from jaxmoe.quant.format import ExpertFormat
from jaxmoe.quant.nibbles import pack_nibbles


def _stored(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x rounded to the storage dtype, back in float32 (what the program will read)."""
    return x.astype(dtype).astype(np.float32)


def quantize_int8(w: np.ndarray, dtype: np.dtype) -> dict[str, np.ndarray]:
    """w [K, N] float -> {"q": int8 [K, N], "scale": dtype [1, N]}."""
    w = w.astype(np.float32)
    scale = np.max(np.abs(w), axis=0, keepdims=True) / 127.0
    scale = _stored(np.where(scale > 0, scale, 1.0), dtype)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return {"q": q, "scale": scale.astype(dtype)}


def quantize_int4(w: np.ndarray, dtype: np.dtype, group_size: int, refine: int = 0) -> dict[str, np.ndarray]:
    """w [K, N] float -> {"q": uint8 [K/2, N] two values per byte, "scale", "zero": dtype [K/g, N]}.
    `refine`: rounds of zero-point refinement (0: plain round to nearest)."""
    k, n = w.shape
    g = w.astype(np.float32).reshape(k // group_size, group_size, n)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scale = _stored(np.where(hi > lo, (hi - lo) / 15.0, 1.0), dtype)
    zero = _stored(np.clip(np.rint(-lo / scale), 0, 15), dtype)
    for _ in range(refine):
        q = np.clip(np.rint(g / scale[:, None] + zero[:, None]), 0, 15)
        # The zero point that best reconstructs the group for these values (least squares),
        # kept in the storage dtype: the mean of q - w / scale over the group.
        zero = _stored(np.clip(np.mean(q - g / scale[:, None], axis=1), 0, 15), dtype)
    q = np.clip(np.rint(g / scale[:, None] + zero[:, None]), 0, 15).astype(np.uint8).reshape(k, n)
    return {"q": pack_nibbles(q), "scale": scale.astype(dtype), "zero": zero.astype(dtype)}


def quantize_expert(fmt: ExpertFormat, cfg, w_gate_up: np.ndarray, w_down: np.ndarray, refine: int = 0,
                    biases: tuple | None = None) -> dict:  # fmt: skip
    """One expert's parts {(matrix, role): array} in `fmt`; dense keeps the weights (in the
    model dtype). Scales and zero points are stored in the model dtype; biases (gpt-oss:
    (gate_up [2I], down [D])) are kept in it, never quantized."""
    dtype = np.dtype(jnp.dtype(cfg.dtype))
    out = {}
    for matrix, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        w = np.asarray(w)
        if fmt.kind == "dense":
            out[matrix, "w"] = w.astype(dtype)
            continue
        if fmt.kind == "mxfp4":
            parts = mxfp4.quantize(w)
        elif fmt.kind == "int8":
            parts = quantize_int8(w, dtype)
        else:
            parts = quantize_int4(w, dtype, fmt.group_size, refine)
        out.update({(matrix, role): value for role, value in parts.items()})
    if biases is not None:
        out["w_gate_up", "bias"], out["w_down", "bias"] = (np.asarray(b).astype(dtype) for b in biases)
    return out


def pack_expert(fmt: ExpertFormat, cfg, w_gate_up: np.ndarray, w_down: np.ndarray, refine: int = 0,
                biases: tuple | None = None) -> np.ndarray:  # fmt: skip
    """One expert's weights as its uint8 buffer in `fmt` (quantized first where it asks)."""
    return fmt.pack(cfg, quantize_expert(fmt, cfg, w_gate_up, w_down, refine, biases))


def packed_rows(cfg, stack, fmt: ExpertFormat, refine: int = 0) -> Iterator[np.ndarray]:
    """A layer's experts, one uint8 buffer each in `fmt`, made as they are asked for: packed
    rows ([E, bytes]) as they are, or dense stacks packed (quantized first where `fmt` asks)."""
    if not isinstance(stack, ExpertWeights):
        rows = np.asarray(stack)
        if rows.shape != (cfg.num_experts, fmt.nbytes(cfg)) or rows.dtype != np.uint8:
            raise ValueError(f"packed experts: expected uint8 {(cfg.num_experts, fmt.nbytes(cfg))} for {fmt.name}, "
                             f"got {rows.dtype} {rows.shape}")  # fmt: skip
        yield from rows
        return
    gate_up, down = np.asarray(stack.w_gate_up), np.asarray(stack.w_down)
    biases = None if stack.b_gate_up is None else (np.asarray(stack.b_gate_up), np.asarray(stack.b_down))
    for e in range(cfg.num_experts):
        yield pack_expert(fmt, cfg, gate_up[e], down[e], refine, None if biases is None else (biases[0][e], biases[1][e]))
