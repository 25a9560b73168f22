"""Reading checkpoints written before `params.safetensors`: one Orbax tree under `params/`,
{"dense": dense pure dict, "experts": {"<layer>": {"w_gate_up", "w_down"}}} with string keys.

Orbax's partial restore reads one subtree (the dense part, or one layer's experts) into
numpy, so loading such a checkpoint also goes a layer at a time, though Orbax's own
buffers add up to about two layers more while it restores one (converting the model
again gives params.safetensors, which reads without them). Numpy rather than a device
or pinned-host target because a restore into a pinned_host sharding has been seen to
pass through device memory. These trees carry no checksums, so a damaged file would load
unnoticed: loading one says so once and names the way out (convert it again).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.checkpoint.params_file import ParamsSource, expected, expert_names, leaves, str_keys
from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights, dense_shapes

DIRECTORY = "params"


class UncheckedWeightsWarning(UserWarning):
    """A checkpoint whose weights carry no checksums."""


def _at(tree: dict, path: tuple):
    for key in path:
        tree = tree[str(key)]
    return tree


class OrbaxParamsReader(ParamsSource):
    """The weights of an Orbax `params/` tree."""

    def __init__(self, directory: str | Path, cfg: MoEConfig):
        self.cfg = cfg
        self.path = Path(directory).resolve() / DIRECTORY
        self._config = Path(directory) / "config.json"
        self._checkpointer = ocp.PyTreeCheckpointer()
        warnings.warn(
            f"{self.path}: an Orbax tree from before params.safetensors, with no checksums: a damaged file "
            "would load unnoticed. Convert the model again (scripts/convert_hf.py) for a checked checkpoint",
            UncheckedWeightsWarning,
            stacklevel=2,
        )

    def _restore(self, item: dict) -> dict:
        """The subtree `item` (ShapeDtypeStructs) as numpy, checked against it."""
        args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), item)
        try:
            tree = self._checkpointer.restore(
                self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.path}: does not match {self._config} ({e})") from e
        for path, want in leaves(item):
            got = _at(tree, path)
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(
                    f"{self.path}: {'/'.join(path)} has shape {tuple(got.shape)}, {self._config} implies {want.shape}"
                )
        return tree

    def dense(self) -> Iterator[tuple[tuple, np.ndarray]]:
        shapes = dense_shapes(self.cfg)
        tree = self._restore({"dense": str_keys(shapes)})["dense"]
        for path, _ in leaves(shapes):
            yield path, _at(tree, path[:-1]).pop(str(path[-1]))  # handed over, not kept here

    def experts(self, layer: int) -> ExpertWeights:
        specs = expected(self.cfg)
        item = {
            field: jax.ShapeDtypeStruct(*specs[name]) for field, name in zip(ExpertWeights._fields, expert_names(layer))
        }
        return ExpertWeights(**self._restore({"experts": {str(layer): item}})["experts"][str(layer)])

    def close(self) -> None:
        self._checkpointer.close()
