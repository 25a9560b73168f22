"""Assemble jaxmoe parameters from Hugging Face tensors, one tensor at a time.

`plan_tensors` checks every name and shape against the config before anything is
read; `dense_value` and `layer_experts` then turn the tensors `read(name)` returns
into jaxmoe's layout, so a caller can write each dense tensor and each layer's
experts as soon as they exist (conversion holds one layer, not the model).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.checkpoint.hf_keys import (
    IGNORED,
    DenseTarget,
    ExpertTarget,
    beyond_the_layers,
    dense_targets,
    expert_targets,
    router_aliases,
)
from jaxmoe.model.experts import ExpertWeights


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_shape(source: str, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(got)}, expected {tuple(want)}")


def name_list(names: list[str], limit: int = 5) -> str:
    """`names` quoted for an error message, the first few of a long list."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Where each Hugging Face tensor goes, by name, in the order they were listed."""

    dense: dict[str, DenseTarget]
    experts: dict[int, dict[str, ExpertTarget]]  # per MoE layer


def plan_tensors(cfg: MoEConfig, names: Iterable[str], shape_of: Callable[[str], tuple], source: str) -> TensorPlan:
    """Check every tensor's name and shape (from `shape_of`, nothing is read) and that none is missing."""
    dense_t, aliases = dense_targets(cfg), router_aliases(cfg)
    per_expert, fused = expert_targets(cfg)
    dense: dict[str, DenseTarget] = {}
    experts: dict[int, dict[str, ExpertTarget]] = {layer: {} for layer in cfg.moe_layer_ids}
    layout: dict[int, str] = {}
    seen: set[str] = set()
    for name in names:
        if IGNORED.match(name):
            continue
        key = aliases.get(name, name)
        if key in dense_t:
            _check_shape(source, name, shape_of(name), dense_t[key].shape)
            dense[name] = dense_t[key]
        elif key in per_expert or key in fused:
            target = per_expert.get(key) or fused[key]
            _check_shape(source, name, shape_of(name), target.shape)
            kind = "per-expert" if key in per_expert else "fused"
            shared = key in per_expert and key in fused  # in both layouts (gpt-oss's biases)
            if not shared and layout.setdefault(target.layer, kind) != kind:
                raise CheckpointError(
                    f"{source}: layer {target.layer} mixes per-expert and fused expert tensors (at {name!r})"
                )
            experts[target.layer][name] = target
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        elif beyond_the_layers(cfg, name):
            continue
        else:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {cfg.family} config")
        seen.add(key)

    missing = [n for n in dense_t if n not in seen]
    for layer in cfg.moe_layer_ids:
        wanted = per_expert if layout.get(layer, "per-expert") == "per-expert" else fused
        missing += [n for n, t in wanted.items() if t.layer == layer and n not in seen]
    if missing:
        raise CheckpointError(f"{source}: missing tensors {name_list(missing)}")
    return TensorPlan(dense, experts)


def dense_value(target: DenseTarget, value: np.ndarray, dtype) -> np.ndarray:
    """A Hugging Face dense tensor as the jaxmoe parameter (torch Linear [out, in] -> kernel [in, out])."""
    value = value.astype(dtype, copy=False)
    return np.ascontiguousarray(value.T) if target.transpose else value


def layer_experts(cfg: MoEConfig, plan: TensorPlan, layer: int, read: Callable[[str], np.ndarray]) -> ExpertWeights:
    """One MoE layer's expert stacks ([E, D, 2I], [E, I, D]) in `cfg.dtype`, read one tensor at a time
    (a gpt-oss MXFP4 layer: its mxfp4 rows [E, bytes] uint8, never widened)."""
    dtype = np_dtype(cfg.dtype)
    if cfg.family == "gpt_oss":  # its own layouts: jaxmoe/checkpoint/gpt_oss_keys.py
        from jaxmoe.checkpoint import gpt_oss_keys

        targets = plan.experts[layer]
        if gpt_oss_keys.is_mxfp4(targets):
            return gpt_oss_keys.mxfp4_layer(cfg, targets, read, dtype)
        return gpt_oss_keys.dense_layer(cfg, targets, read, dtype)
    e, d, width = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    gate_up, down = np.empty((e, d, 2 * width), dtype), np.empty((e, width, d), dtype)
    for name, target in plan.experts[layer].items():
        value = read(name).astype(dtype, copy=False)
        if target.part == "gate":
            gate_up[target.expert, :, :width] = value.T
        elif target.part == "up":
            gate_up[target.expert, :, width:] = value.T
        elif target.part == "down":
            down[target.expert] = value.T
        elif target.part == "gate_up_fused":
            gate_up[...] = value.transpose(0, 2, 1)
        else:
            down[...] = value.transpose(0, 2, 1)
    return ExpertWeights(gate_up, down)


def assemble(
    cfg: MoEConfig,
    names: Iterable[str],
    shape_of: Callable[[str], tuple],
    read: Callable[[str], np.ndarray],
    source: str,
) -> tuple[dict, tuple[ExpertWeights | None, ...]]:
    """The whole model at once: (dense pure dict, per-layer expert stacks) as numpy arrays in `cfg.dtype`."""
    plan = plan_tensors(cfg, names, shape_of, source)
    dense: dict = {}
    for name, target in plan.dense.items():
        _set(dense, target.path, dense_value(target, read(name), np_dtype(cfg.dtype)))
    experts = tuple(
        layer_experts(cfg, plan, i, read) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)
    )
    return dense, experts


def np_dtype(name: str) -> np.dtype:
    """A config's dtype name as numpy's (bfloat16 from ml_dtypes)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
