"""gpt-oss's routed experts in a Hugging Face checkpoint, and how they become jaxmoe's.

Two layouts, per MoE layer `model.layers.L.mlp.experts.`:
  bf16   gate_up_proj [E, D, 2I] (input first; gate and up interleaved column by column:
         gate = [..., 0::2], up = [..., 1::2]), down_proj [E, I, D]
  MXFP4  gate_up_proj_blocks [E, 2I, D/32, 16] + gate_up_proj_scales [E, 2I, D/32],
         down_proj_blocks [E, D, I/32, 16] + down_proj_scales [E, D, I/32] (uint8, the
         layout transformers' mxfp4 integration reads; jaxmoe/quant/mxfp4.py)
and in both gate_up_proj_bias [E, 2I] (interleaved too) and down_proj_bias [E, D].
jaxmoe keeps gate then up ([:I], [I:]), so gate_up's output columns (rows of an MXFP4
matrix) are put in that order here: a permutation, nothing rounded. MXFP4 experts stay
MXFP4 (the `mxfp4` expert format): never widened on the way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxmoe.checkpoint.targets import ExpertTarget
from jaxmoe.config import MoEConfig
from jaxmoe.model.experts import ExpertWeights, expert_activation
from jaxmoe.quant import mxfp4
from jaxmoe.quant.format import ExpertFormat

BLOCK_PARTS = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales")


def gpt_oss_expert_targets(cfg: MoEConfig) -> tuple[dict[str, ExpertTarget], dict[str, ExpertTarget]]:
    """(MXFP4 names, bf16 names); the biases are in both."""
    d, i, e = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    packed, dense = {}, {}
    for layer in cfg.moe_layer_ids:
        p = f"model.layers.{layer}.mlp.experts"
        biases = {f"{p}.gate_up_proj_bias": ExpertTarget(layer, "gate_up_bias", None, (e, 2 * i)),
                  f"{p}.down_proj_bias": ExpertTarget(layer, "down_bias", None, (e, d))}  # fmt: skip
        dense |= biases | {f"{p}.gate_up_proj": ExpertTarget(layer, "gate_up_interleaved", None, (e, d, 2 * i)),
                           f"{p}.down_proj": ExpertTarget(layer, "down_in_first", None, (e, i, d))}  # fmt: skip
        packed |= biases
        for proj, n, k in (("gate_up", 2 * i, d), ("down", d, i)):
            groups = k // mxfp4.BLOCK
            packed[f"{p}.{proj}_proj_blocks"] = ExpertTarget(layer, f"{proj}_blocks", None, (e, n, groups, mxfp4.BLOCK // 2))
            packed[f"{p}.{proj}_proj_scales"] = ExpertTarget(layer, f"{proj}_scales", None, (e, n, groups))
    return packed, dense


def is_mxfp4(targets: dict[str, ExpertTarget]) -> bool:
    """Whether a layer's planned tensors are the MXFP4 layout."""
    return any(t.part in BLOCK_PARTS for t in targets.values())


def _gate_then_up(width: int) -> np.ndarray:
    """Interleaved gate/up columns -> gate columns then up columns."""
    return np.concatenate([np.arange(0, 2 * width, 2), np.arange(1, 2 * width, 2)])


def _read_parts(targets: dict[str, ExpertTarget], read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    return {t.part: read(name) for name, t in targets.items()}


def dense_layer(cfg: MoEConfig, targets: dict[str, ExpertTarget], read, dtype) -> ExpertWeights:
    """A bf16-layout layer as ExpertWeights stacks in `dtype` (biases and activation included)."""
    order = _gate_then_up(cfg.expert_intermediate_size)
    t = _read_parts(targets, read)
    return ExpertWeights(
        np.ascontiguousarray(t["gate_up_interleaved"][:, :, order].astype(dtype, copy=False)),
        t["down_in_first"].astype(dtype, copy=False),
        np.ascontiguousarray(t["gate_up_bias"][:, order].astype(dtype, copy=False)),
        t["down_bias"].astype(dtype, copy=False),
        expert_activation(cfg),
    )


def mxfp4_layer(cfg: MoEConfig, targets: dict[str, ExpertTarget], read, dtype) -> np.ndarray:
    """An MXFP4-layout layer as the mxfp4 format's rows [E, bytes]: the blocks and scales
    moved byte for byte (gate_up's rows reordered), the biases cast to the model dtype."""
    fmt = ExpertFormat("mxfp4")
    order = _gate_then_up(cfg.expert_intermediate_size)
    t = _read_parts(targets, read)
    rows = np.empty((cfg.num_experts, fmt.nbytes(cfg)), np.uint8)
    for e in range(cfg.num_experts):
        parts = {}
        for matrix, proj, rows_order in (("w_gate_up", "gate_up", order), ("w_down", "down", slice(None))):
            q, scale = mxfp4.from_hf(t[f"{proj}_blocks"][e][rows_order], t[f"{proj}_scales"][e][rows_order])
            parts[matrix, "q"], parts[matrix, "scale"] = q, scale
        parts["w_gate_up", "bias"] = t["gate_up_bias"][e][order].astype(dtype)
        parts["w_down", "bias"] = t["down_bias"][e].astype(dtype)
        rows[e] = fmt.pack(cfg, parts)
    return rows


def hf_layer_tensors(cfg: MoEConfig, layer: int, w: ExpertWeights) -> dict[str, np.ndarray]:
    """A layer's experts as the bf16 layout's tensors (export): gate and up interleaved again."""
    interleave = np.argsort(_gate_then_up(cfg.expert_intermediate_size))  # the inverse permutation
    p = f"model.layers.{layer}.mlp.experts"
    return {
        f"{p}.gate_up_proj": np.ascontiguousarray(np.asarray(w.w_gate_up)[:, :, interleave]),
        f"{p}.gate_up_proj_bias": np.ascontiguousarray(np.asarray(w.b_gate_up)[:, interleave]),
        f"{p}.down_proj": np.asarray(w.w_down),
        f"{p}.down_proj_bias": np.asarray(w.b_down),
    }
