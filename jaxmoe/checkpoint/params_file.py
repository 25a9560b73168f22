"""`params.safetensors`: a jaxmoe checkpoint's weights, one tensor per dense parameter
and two per MoE layer.

  dense.<key path>          e.g. dense.layers.0.self_attn.q_proj.kernel (the pure dict's keys)
  experts.<layer>.w_gate_up [E, D, 2I]
  experts.<layer>.w_down    [E, I, D]
  experts.<layer>.b_gate_up [E, 2I], experts.<layer>.b_down [E, D]: expert biases (gpt-oss),
                            dense format only (a packed row carries its expert's biases)
  experts.<layer>.packed    [E, bytes] uint8, instead of the two above when the experts are
                            quantized (expert_format.json): each row one expert's buffer

Safetensors rather than Orbax because every tensor's place in the file is fixed by
the header: a writer emits each tensor (or one layer's experts) as soon as it exists
and a reader takes one at a time, so neither holds the model in memory. Orbax writes
a tree in one call, with the whole tree (and an internal copy) in memory. The price:
no compression, so bf16 weights take about a quarter more disk than Orbax's zstd.
Each tensor carries a CRC32 in the header, checked whenever the tensor is read, so a
damaged file is refused by name instead of loading wrong weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from jaxmoe.checkpoint.assemble import CheckpointError, name_list, np_dtype
from jaxmoe.checkpoint.safetensors_io import SafetensorsFile
from jaxmoe.checkpoint.safetensors_write import SafetensorsWriter
from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights, dense_shapes
from jaxmoe.model.experts import expert_activation
from jaxmoe.quant import DENSE, ExpertFormat

FILE = "params.safetensors"


def leaves(tree: dict, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(key path, leaf) of a nested dict, depth first in insertion order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, path + (key,))
        else:
            yield path + (key,), value


def str_keys(tree):
    """The dense pure dict with its int (layer) keys as strings, as Orbax trees want them."""
    return {str(k): str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def int_keys(tree):
    """The inverse of `str_keys`."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if k.isdigit() else k: int_keys(v) for k, v in tree.items()}


def dense_name(path: tuple) -> str:
    return ".".join(("dense",) + tuple(str(k) for k in path))


def expert_names(layer: int) -> tuple[str, str]:
    return f"experts.{layer}.w_gate_up", f"experts.{layer}.w_down"


def bias_names(layer: int) -> tuple[str, str]:
    return f"experts.{layer}.b_gate_up", f"experts.{layer}.b_down"


def packed_name(layer: int) -> str:
    return f"experts.{layer}.packed"


def expected(cfg: MoEConfig, fmt: ExpertFormat = DENSE) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every tensor the config (and expert format) implies: name -> (shape, dtype)."""
    specs = {dense_name(p): (tuple(s.shape), np.dtype(s.dtype)) for p, s in leaves(dense_shapes(cfg))}
    e, d, i, dtype = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, np_dtype(cfg.dtype)
    for layer in cfg.moe_layer_ids:
        if fmt.kind != "dense":
            specs[packed_name(layer)] = ((e, fmt.nbytes(cfg)), np.dtype(np.uint8))
            continue
        gate_up, down = expert_names(layer)
        specs[gate_up], specs[down] = ((e, d, 2 * i), dtype), ((e, i, d), dtype)
        if cfg.expert_bias:
            b_gate_up, b_down = bias_names(layer)
            specs[b_gate_up], specs[b_down] = ((e, 2 * i), dtype), ((e, d), dtype)
    return specs


class ParamsWriter:
    """Write `directory/params.safetensors`: declare every tensor, then `dense(path, value)` and
    `experts(layer, weights)` in any order; closing checks that nothing was left out."""

    def __init__(self, directory: str | Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self._file = SafetensorsWriter(Path(directory) / FILE, specs, metadata={"format": "jaxmoe"}, checksums=True)

    @classmethod
    def like(cls, directory, dense: dict, experts: dict[int, ExpertWeights]) -> "ParamsWriter":
        """Declared from arrays (or ShapeDtypeStructs): the dense pure dict and {layer: stacks}."""
        specs = {dense_name(p): (a.shape, a.dtype) for p, a in leaves(dense)}
        for layer, w in experts.items():
            specs.update({n: (a.shape, a.dtype) for n, a in zip(expert_names(layer) + bias_names(layer), w.arrays())})
        return cls(directory, specs)

    def dense(self, path: tuple, value) -> None:
        self._file.write(dense_name(path), value)

    def experts(self, layer: int, weights: ExpertWeights) -> None:
        for name, value in zip(expert_names(layer) + bias_names(layer), weights.arrays()):
            self._file.write(name, value)

    def packed(self, layer: int, rows: np.ndarray) -> None:
        """A quantized layer: one packed byte row per expert."""
        self._file.write(packed_name(layer), rows)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ParamsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.__exit__(*exc)


class ParamsSource:
    """A checkpoint's weights, read on demand as host numpy in the dtypes the model computes in:
    `dense()` yields (key path, value) one tensor at a time, `experts(layer)` gives one
    layer's stacks. A context manager; `store.open_params` picks the kind."""

    def dense(self) -> Iterator[tuple[tuple, np.ndarray]]:
        raise NotImplementedError

    def experts(self, layer: int) -> ExpertWeights:
        raise NotImplementedError

    def packed(self, layer: int) -> np.ndarray:
        """A quantized checkpoint's layer: [E, bytes] uint8, one row per expert."""
        raise CheckpointError(f"{self}: a dense checkpoint has no packed experts")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ParamsReader(ParamsSource):
    """Read `directory/params.safetensors`. Names and shapes are checked against the config
    when the reader opens, before anything is read."""

    def __init__(self, directory: str | Path, cfg: MoEConfig, fmt: ExpertFormat = DENSE):
        self.cfg, self.format = cfg, fmt
        self._file = SafetensorsFile(Path(directory) / FILE)
        self._specs = expected(cfg, fmt)
        config = Path(directory) / "config.json"
        stored = self._file.entries
        missing = [n for n in self._specs if n not in stored]
        extra = [n for n in stored if n not in self._specs]
        if missing or extra:
            parts = ([f"missing {name_list(missing)}"] if missing else []) + (
                [f"unexpected {name_list(extra)}"] if extra else []
            )
            raise CheckpointError(f"{self._file.path}: does not match {config} ({'; '.join(parts)})")
        for name, (shape, _) in self._specs.items():
            if tuple(stored[name]["shape"]) != shape:
                raise CheckpointError(
                    f"{self._file.path}: tensor {name!r} has shape {tuple(stored[name]['shape'])}, "
                    f"{config} implies {shape}"
                )

    def _read(self, name: str) -> np.ndarray:
        return self._file.read(name).astype(self._specs[name][1], copy=False)

    def dense(self) -> Iterator[tuple[tuple, np.ndarray]]:
        for path, _ in leaves(dense_shapes(self.cfg)):
            yield path, self._read(dense_name(path))

    def experts(self, layer: int) -> ExpertWeights:
        if self.format.kind != "dense":
            raise CheckpointError(f"{self._file.path}: the experts are {self.format.name}: read them packed")
        w = ExpertWeights(*(self._read(name) for name in expert_names(layer)))
        if not self.cfg.expert_bias:
            return w
        return w._replace(**dict(zip(("b_gate_up", "b_down"), map(self._read, bias_names(layer)))),
                          act=expert_activation(self.cfg))  # fmt: skip

    def packed(self, layer: int) -> np.ndarray:
        if self.format.kind == "dense":
            raise CheckpointError(f"{self._file.path}: the experts are dense: there is nothing packed")
        return self._read(packed_name(layer))

    def close(self) -> None:
        self._file.close()
