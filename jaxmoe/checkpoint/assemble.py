"""Assemble jaxmoe parameters from Hugging Face tensors, one tensor at a time.

`read(name)` is called once per tensor, so only the output (about one model size)
and the tensor being copied are in host memory at once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.checkpoint.hf_keys import IGNORED, dense_targets, expert_targets, router_aliases
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


def _list(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def assemble(
    cfg: MoEConfig,
    names: Iterable[str],
    shape_of: Callable[[str], tuple],
    read: Callable[[str], np.ndarray],
    source: str,
) -> tuple[dict, tuple[ExpertWeights | None, ...]]:
    """(dense pure dict, per-layer expert stacks) as numpy arrays in `cfg.dtype`.

    Shapes are checked from `shape_of` before anything is read, so a bad tensor
    is reported without reading the file.
    """
    dtype = np.dtype(_np_dtype(cfg.dtype))
    dense_t, aliases = dense_targets(cfg), router_aliases(cfg)
    per_expert, fused = expert_targets(cfg)
    e, d, width = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size

    dense: dict = {}
    gate_up = {layer: None for layer in cfg.moe_layer_ids}
    down = dict(gate_up)
    layout: dict[int, str] = {}
    seen: set[str] = set()

    def stacks(layer: int):
        if gate_up[layer] is None:
            gate_up[layer] = np.empty((e, d, 2 * width), dtype)
            down[layer] = np.empty((e, width, d), dtype)
        return gate_up[layer], down[layer]

    for name in names:
        if IGNORED.match(name):
            continue
        key = aliases.get(name, name)
        if key in dense_t:
            target = dense_t[key]
            _check_shape(source, name, shape_of(name), target.shape)
            value = read(name).astype(dtype)
            _set(dense, target.path, np.ascontiguousarray(value.T) if target.transpose else value)
        elif key in per_expert or key in fused:
            target = per_expert.get(key) or fused[key]
            _check_shape(source, name, shape_of(name), target.shape)
            kind = "per-expert" if key in per_expert else "fused"
            if layout.setdefault(target.layer, kind) != kind:
                raise CheckpointError(
                    f"{source}: layer {target.layer} mixes per-expert and fused expert tensors (at {name!r})"
                )
            gu, dn = stacks(target.layer)
            value = read(name).astype(dtype)
            if target.part == "gate":
                gu[target.expert, :, :width] = value.T
            elif target.part == "up":
                gu[target.expert, :, width:] = value.T
            elif target.part == "down":
                dn[target.expert] = value.T
            elif target.part == "gate_up_fused":
                gu[...] = value.transpose(0, 2, 1)
            else:
                dn[...] = value.transpose(0, 2, 1)
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        else:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {cfg.family} config")
        seen.add(key)

    missing = [n for n in dense_t if n not in seen]
    for layer in cfg.moe_layer_ids:
        kind = layout.get(layer, "per-expert")
        wanted = per_expert if kind == "per-expert" else fused
        missing += [n for n, t in wanted.items() if t.layer == layer and n not in seen]
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_list(missing)}")
    experts = tuple(
        ExpertWeights(gate_up[i], down[i]) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)
    )
    return dense, experts


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
