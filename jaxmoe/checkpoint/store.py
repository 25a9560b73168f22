"""The jaxmoe checkpoint format, and loading it.

A directory holding:
  config.json              the original Hugging Face config, untouched
  generation_config.json
  tokenizer files          when the source had them
  params/                  Orbax: {"dense": dense pure dict,
                                   "experts": {"<layer>": {"w_gate_up", "w_down"}}}
Orbax wants string keys, so the dense dict's int layer keys are stored as strings.
Restoring uses a target built from the config alone, which is where the caller
chooses placement (e.g. experts in pinned host memory).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.config import MoEConfig, load_hf_config
from jaxmoe.model import ExpertWeights, MoEDecoder, build_model, dense_shapes

PARAMS = "params"


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _int_keys(tree):
    if not isinstance(tree, dict):
        return tree
    return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def save_params(path: str | Path, dense: dict, experts: tuple[ExpertWeights | None, ...]) -> None:
    """Write `path/params` (numpy or jax arrays); `path` must exist, `path/params` must not."""
    tree = {
        "dense": _str_keys(dense),
        "experts": {str(i): w._asdict() for i, w in enumerate(experts) if w is not None},
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).resolve() / PARAMS, tree)
        ckptr.wait_until_finished()


def expert_shapes(cfg: MoEConfig, sharding: jax.sharding.Sharding | None = None) -> dict[int, ExpertWeights]:
    """Per MoE layer, the expert stacks as ShapeDtypeStructs (a restore target)."""
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    return {
        layer: ExpertWeights(
            jax.ShapeDtypeStruct((e, d, 2 * i), cfg.dtype, sharding=sharding),
            jax.ShapeDtypeStruct((e, i, d), cfg.dtype, sharding=sharding),
        )
        for layer in cfg.moe_layer_ids
    }


def restore_params(
    path: str | Path, cfg: MoEConfig, sharding: jax.sharding.Sharding | None = None
) -> tuple[dict, tuple[ExpertWeights | None, ...]]:
    """(dense pure dict, per-layer experts) as jax arrays.

    Dense weights go to the default device; `sharding` places the routed experts
    (default: the default device too).
    """
    params = Path(path).resolve() / PARAMS
    if not params.is_dir():
        raise CheckpointError(f"{path}: no {PARAMS}/ directory (convert the model with scripts/convert_hf.py)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dense = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), dense_shapes(cfg))
    experts = expert_shapes(cfg, sharding or device)
    target = {"dense": _str_keys(dense), "experts": {str(k): w._asdict() for k, w in experts.items()}}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(params, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{params}: does not match {path}/config.json ({e})") from e
    restored = tuple(
        ExpertWeights(**tree["experts"][str(i)]) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)
    )
    return _int_keys(tree["dense"]), restored


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: MoEConfig
    model: MoEDecoder  # dense weights
    experts: tuple[ExpertWeights | None, ...]  # routed experts, one entry per layer
    generation_config: dict
    tokenizer_path: Path | None  # tokenizer.json, when the checkpoint has one
    path: Path


def load(path: str | Path, sharding: jax.sharding.Sharding | None = None) -> LoadedModel:
    """Load a jaxmoe checkpoint directory; `sharding` places the routed experts."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a jaxmoe checkpoint directory)")
    cfg = load_hf_config(path)
    dense, experts = restore_params(path, cfg, sharding)
    gen = path / "generation_config.json"
    tokenizer = path / "tokenizer.json"
    return LoadedModel(
        config=cfg,
        model=build_model(cfg, dense),
        experts=experts,
        generation_config=json.loads(gen.read_text()) if gen.is_file() else {},
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
        path=path,
    )
