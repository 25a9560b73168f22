"""Read a Hugging Face safetensors checkpoint lazily, one tensor at a time.

A directory holds either `model.safetensors` or shards listed by
`model.safetensors.index.json`. Every file's header is parsed and checked up
front (a truncated download fails before any conversion work), tensors are read
only when asked for.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxmoe.checkpoint.assemble import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header ({name: {dtype, shape, data_offsets}})."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header incomplete)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if size < 8 + length + end:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes; its header describes {8 + length + end})"
        )
    return header


def _read_index(path: Path) -> dict[str, str]:
    def unique(pairs):
        out = {}
        for key, value in pairs:
            if key in out and out[key] != value:
                raise CheckpointError(f"{path}: tensor {key!r} is listed in two shards, {out[key]!r} and {value!r}")
            out[key] = value
        return out

    try:
        return json.loads(path.read_text(), object_pairs_hook=unique)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors index ({e!r})") from None


class SafetensorsCheckpoint:
    """Tensor names, shapes and lazy reads over one file or a sharded set.

    Use as a context manager so the memory-mapped files are closed.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        single, index = self.directory / WEIGHTS, self.directory / INDEX
        if single.is_file():
            self.source, files = single, [single]
            weight_map = None
        elif index.is_file():
            self.source, weight_map = index, _read_index(index)
            files = [self.directory / shard for shard in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: names shard {f.name!r}, which is not in {self.directory}")
        else:
            raise CheckpointError(
                f"{self.directory}: no {WEIGHTS} or {INDEX} (only safetensors checkpoints are supported)"
            )

        self._file: dict[str, Path] = {}
        self._entry: dict[str, dict] = {}
        for f in files:
            # Data-offset order: reading the names in turn walks each file front to back.
            entries = sorted(read_header(f).items(), key=lambda kv: kv[1]["data_offsets"][0])
            for name, entry in entries:
                if name in self._file:
                    raise CheckpointError(f"{f}: tensor {name!r} is also in {self._file[name]}")
                self._file[name], self._entry[name] = f, entry
        for name, shard in (weight_map or {}).items():
            found = self._file.get(name)
            if found != self.directory / shard:
                where = f"it is in {found.name!r}" if found else "no shard has it"
                raise CheckpointError(f"{index}: lists tensor {name!r} in {shard!r}, but {where}")
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    @property
    def names(self) -> list[str]:
        return list(self._file)

    def file_of(self, name: str) -> Path:
        return self._file[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        path = self._file[name]
        try:
            if path not in self._handles:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="np"))
            return self._handles[path].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
