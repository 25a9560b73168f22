"""The jaxmoe checkpoint format, and loading it.

A directory holding:
  config.json              the original Hugging Face config, untouched
  generation_config.json
  tokenizer files          when the source had them
  params.safetensors       the weights (params_file.py), written and read a tensor or a
                           layer at a time
Checkpoints written before params.safetensors hold an Orbax tree under params/ instead
(legacy_params.py); they load the same way.

Loading reads the weights into host numpy and places them with `jax.device_put`: the
dense weights on the default device, each layer's experts where the caller says, one
layer at a time, so host memory holds one layer beyond what is kept.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Iterator

import jax

import numpy as np

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.checkpoint.expert_format import read_format
from jaxmoe.checkpoint.legacy_params import DIRECTORY as LEGACY_DIRECTORY
from jaxmoe.checkpoint.legacy_params import OrbaxParamsReader
from jaxmoe.checkpoint.params_file import FILE, ParamsReader, ParamsSource, ParamsWriter, leaves
from jaxmoe.config import MoEConfig, load_hf_config
from jaxmoe.model import ExpertWeights, MoEDecoder, build_model
from jaxmoe.quant import ExpertFormat, packed_experts


def save_params(path: str | Path, dense: dict, experts: tuple[ExpertWeights | None, ...]) -> None:
    """Write `path/params.safetensors` from numpy or jax arrays; `path` must exist."""
    layers = {i: w for i, w in enumerate(experts) if w is not None}
    with ParamsWriter.like(path, dense, layers) as out:
        for key_path, value in leaves(dense):
            out.dense(key_path, value)
        for layer, w in layers.items():
            out.experts(layer, w)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory with its config and expert format, each read once
    (`open_checkpoint`): what every loader here takes in place of a path."""

    path: Path
    config: MoEConfig
    expert_format: ExpertFormat


def open_checkpoint(source: "str | Path | Checkpoint") -> Checkpoint:
    """`source` opened (a Checkpoint is returned as it is); CheckpointError without config.json."""
    if isinstance(source, Checkpoint):
        return source
    path = Path(source)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a jaxmoe checkpoint directory)")
    cfg = load_hf_config(path)
    return Checkpoint(path, cfg, read_format(path, cfg))


def open_params(source: str | Path | Checkpoint) -> ParamsSource:
    """The checkpoint's weights, in either layout, read on demand (see ParamsSource)."""
    ckpt = open_checkpoint(source)
    path, cfg = ckpt.path, ckpt.config
    if (path / FILE).is_file():
        return ParamsReader(path, cfg, ckpt.expert_format)
    if (path / LEGACY_DIRECTORY).is_dir():
        return OrbaxParamsReader(path, cfg)
    raise CheckpointError(f"{path}: no {FILE} (convert the model with scripts/convert_hf.py)")


def expert_layers(source: str | Path | Checkpoint) -> Iterator[ExpertWeights | np.ndarray | None]:
    """Per layer, its experts as host numpy (None for dense layers), read when asked for: the
    stacks of a dense checkpoint, the packed rows [E, bytes] of a quantized one. A consumer
    that drops each before asking for the next holds one layer."""
    ckpt = open_checkpoint(source)
    cfg, packed = ckpt.config, ckpt.expert_format.kind != "dense"
    with open_params(ckpt) as params:
        for layer in range(cfg.num_layers):
            if not cfg.moe_layers[layer]:
                yield None
            else:
                yield params.packed(layer) if packed else params.experts(layer)


def place(values, sharding):
    """`jax.device_put` of host numpy (any pytree), waited for.

    jaxlib lets go of a finished copy's source lazily, in a gc callback, so without a gc
    pass a layer's numpy would outlive its copy until the next collection, beside the
    next layer. The (cheap, youngest-generation) pass here usually frees it at once; the
    copying thread sometimes posts the release just after, and then the next call frees it.
    """
    placed = jax.block_until_ready(jax.device_put(values, sharding))
    gc.collect(0)
    return placed


def restore_dense(source: str | Path | Checkpoint) -> dict:
    """The dense pure dict, each tensor read and put on the default device in turn."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dense: dict = {}
    with open_params(source) as params:
        for key_path, value in params.dense():
            node = dense
            for key in key_path[:-1]:
                node = node.setdefault(key, {})
            node[key_path[-1]] = place(value, device)
    return dense


def restore_params(
    source: str | Path | Checkpoint, sharding: jax.sharding.Sharding | None = None
) -> tuple[dict, tuple]:
    """(dense pure dict, per-layer experts) as jax arrays: ExpertWeights stacks, or for a
    quantized checkpoint PackedExperts over each layer's byte rows.

    Dense weights go to the default device; `sharding` places the routed experts
    (default: the default device too), one layer at a time.
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = open_checkpoint(source)
    cfg, fmt = ckpt.config, ckpt.expert_format
    dense = restore_dense(ckpt)

    def placed(w):
        if w is None:
            return None
        return place(w, sharding) if fmt.kind == "dense" else packed_experts(place(w, sharding), fmt, cfg)

    return dense, tuple(placed(w) for w in expert_layers(ckpt))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: MoEConfig
    model: MoEDecoder  # dense weights
    experts: tuple | None  # routed experts per layer (ExpertWeights or PackedExperts); None when not loaded
    generation_config: dict
    tokenizer_path: Path | None  # tokenizer.json, when the checkpoint has one
    path: Path
    expert_format: ExpertFormat


def load(source: str | Path | Checkpoint, sharding: jax.sharding.Sharding | None = None,
         experts: bool = True) -> LoadedModel:  # fmt: skip
    """Load a jaxmoe checkpoint (a directory, or one `open_checkpoint` opened); `sharding`
    places the routed experts.

    With `experts=False` the experts stay on disk (`LoadedModel.experts` is None), for a
    caller that reads them itself, e.g. `HostExpertStore.from_checkpoint`.
    """
    ckpt = open_checkpoint(source)
    path, cfg = ckpt.path, ckpt.config
    if experts:
        dense, stacks = restore_params(ckpt, sharding)
    else:
        dense, stacks = restore_dense(ckpt), None
    gen = path / "generation_config.json"
    tokenizer = path / "tokenizer.json"
    return LoadedModel(
        config=cfg,
        model=build_model(cfg, dense),
        experts=stacks,
        generation_config=json.loads(gen.read_text()) if gen.is_file() else {},
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
        path=path,
        expert_format=ckpt.expert_format,
    )
