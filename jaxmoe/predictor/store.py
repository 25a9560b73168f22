"""A trained predictor on disk, and loading it only for the model it was trained for.

A directory holding:
  predictor.json   metadata: model summary (hash, MoE layers, experts, top-k, hidden
                   size), layer pairs, arch, width, input projection, training
                   settings, recall, the trace split and per-layer expert frequency, and
                   the CRC32 of every file under params/ (checked before they are read)
  params/          Orbax: the module's state (trained parameters and the projection)
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.checkpoint.file_checksums import directory_checksums, verify_checksums
from jaxmoe.checkpoint.legacy_params import UncheckedWeightsWarning
from jaxmoe.config import MoEConfig
from jaxmoe.model import MoEDecoder
from jaxmoe.offload.prefetch import GateAhead, ModuleScorer, NextLayerScorer
from jaxmoe.predictor.fingerprint import layer_pairs, model_summary, router_hash
from jaxmoe.predictor.mlp import ExpertPredictor

META = "predictor.json"
PARAMS = "params"
VERSION = 1


class PredictorMismatch(ValueError):
    """A predictor trained for another model; the message names the field that differs."""


@dataclasses.dataclass(frozen=True)
class LoadedPredictor:
    module: ExpertPredictor  # call module(h [N, D], layer int32 scalar) -> logits [N, E] of the next MoE layer
    meta: dict
    path: Path

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return self.module.pairs

    @property
    def prefetch_count(self) -> int:
        """How many experts to prefetch per layer: top_k unless the metadata says otherwise."""
        return int(self.meta.get("prefetch_count", self.meta["model"]["top_k"]))


def build_module(meta: dict, projection: np.ndarray | None = None, seed: int = 0) -> ExpertPredictor:
    m = meta["model"]
    return ExpertPredictor(
        num_layers=m["num_layers"],
        pairs=[tuple(p) for p in meta["pairs"]],
        hidden_size=m["hidden_size"],
        num_experts=m["num_experts"],
        width=meta["width"],
        arch=meta["arch"],
        projection=projection,
        rngs=nnx.Rngs(seed),
    )


def save_predictor(out: str | Path, module: ExpertPredictor, meta: dict) -> Path:
    """Write atomically (replacing an existing predictor only once the new one is complete)."""
    out = Path(out)
    with atomic_directory(out, replace=True) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.resolve() / PARAMS, nnx.state(module).to_pure_dict())
            ckptr.wait_until_finished()
        checksums = directory_checksums(tmp / PARAMS)
        (tmp / META).write_text(json.dumps({"version": VERSION, **meta, "checksums": checksums}, indent=1))
    return out


def check_summary(want: dict, have: dict, where: str, what: str = "this model") -> None:
    """Raise PredictorMismatch naming the first field on which two model summaries differ."""
    for field in ("hidden_size", "num_experts", "moe_layers", "num_layers", "top_k", "model_hash"):
        if want.get(field) != have.get(field):
            raise PredictorMismatch(
                f"{where}: predictor was trained for {field}={want.get(field)!r}, {what} has "
                f"{field}={have.get(field)!r}; train one for this model (scripts/train_predictor.py)"
            )


def check_compatible(meta: dict, cfg: MoEConfig, where: str) -> None:
    check_summary(meta["model"], model_summary(cfg), where)
    if [list(p) for p in meta["pairs"]] != [list(p) for p in layer_pairs(cfg)]:
        raise PredictorMismatch(f"{where}: predictor layer pairs {meta['pairs']} do not match the model's")


def read_meta(path: str | Path) -> dict:
    file = Path(path) / META
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {META} (not a predictor directory)")
    meta = json.loads(file.read_text())
    if meta.get("version") != VERSION:
        raise PredictorMismatch(f"{file}: version={meta.get('version')!r}, expected {VERSION}")
    return meta


def check_router(meta: dict, model, where: str) -> None:
    """Refuse a predictor whose traces came from other router weights (a retrained checkpoint
    of the same config passes check_compatible but not this)."""
    want = meta.get("router_hash")
    if want is None:
        return  # trained before the hash was recorded
    have = router_hash(model, model.cfg)
    if want != have:
        raise PredictorMismatch(
            f"{where}: predictor was trained on traces of router_hash={want}, this model has "
            f"router_hash={have} (same config, other weights); train one for this model"
        )


def load_predictor(path: str | Path, cfg: MoEConfig | None, model=None) -> LoadedPredictor:
    """Load a predictor for the model `cfg`; a mismatch raises PredictorMismatch naming the field.

    With `model` (the loaded MoEDecoder) the router weights are checked too.
    `cfg=None` skips the check (evaluation on traces, where the trace manifest is checked instead).
    """
    path = Path(path)
    meta = read_meta(path)
    if cfg is not None:
        check_compatible(meta, cfg, str(path))
    if model is not None:
        check_router(meta, model, str(path))
    if "checksums" in meta:
        verify_checksums(path / PARAMS, meta["checksums"], "train the predictor again (scripts/train_predictor.py)")
    else:
        warnings.warn(f"{path}: a predictor saved without checksums: a damaged file would load unnoticed; "
                      "train it again for a checked one", UncheckedWeightsWarning, stacklevel=2)  # fmt: skip
    proj = meta.get("projection")
    shape = None if proj is None else (meta["model"]["hidden_size"], proj["dim"])
    abstract = nnx.eval_shape(lambda: build_module(meta, None if shape is None else np.zeros(shape, np.float32)))
    graphdef, state = nnx.split(abstract)
    # An explicit placement: without one Orbax restores onto the topology the checkpoint was
    # saved on, and a predictor trained on a CPU refuses to load on a GPU ("Topology mismatch").
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), state.to_pure_dict())
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore((path / PARAMS).resolve(), target)
    nnx.replace_by_pure_dict(state, restored)
    return LoadedPredictor(nnx.merge(graphdef, state), meta, path)


def load_scorer(spec, model: MoEDecoder) -> NextLayerScorer:
    """"gate-ahead", a trained predictor's directory, or a scorer as is; a predictor
    trained for another model is refused (jaxmoe.predictor.PredictorMismatch)."""
    if isinstance(spec, NextLayerScorer):
        return spec
    if spec == "gate-ahead":
        return GateAhead(model)
    # With the model, the router weights are checked too, not only the config.
    return ModuleScorer(load_predictor(spec, model.cfg, model=model).module)
