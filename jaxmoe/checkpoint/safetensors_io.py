"""Read safetensors files one tensor at a time, with plain reads rather than a memory map.

A mapped file's pages count as the process's resident memory for as long as the map
is open, so reading a whole checkpoint through `safe_open` keeps every tensor it has
read resident; `pread`-style reads cost only the tensor being read.

A Hugging Face directory holds either `model.safetensors` or shards listed by
`model.safetensors.index.json`. Every file's header is parsed and checked up front
(a truncated download fails before any conversion work); tensors are read only when
asked for.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxmoe.checkpoint.assemble import CheckpointError

WEIGHTS = "model.safetensors"
# A jaxmoe checkpoint's header metadata holds each tensor's CRC32 under this prefix
# (safetensors_write.py); a reader checks every tensor it reads against it.
CHECKSUM_PREFIX = "crc32:"
INDEX = "model.safetensors.index.json"

# safetensors dtype codes (the format is little-endian, like every host jax runs on).
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def _parse_header(path: Path) -> tuple[dict[str, dict], int, dict[str, str]]:
    """(tensor entries, offset of the data section, metadata) of a safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header incomplete)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        layout = {
            name: (t["dtype"], [int(n) for n in t["shape"]], [int(x) for x in t["data_offsets"]])
            for name, t in header.items()
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    end = max((offsets[1] for _, _, offsets in layout.values()), default=0)
    if size < 8 + length + end:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes; its header describes {8 + length + end})"
        )
    for name, (code, shape, (start, stop)) in layout.items():
        # Checked here, not when read, so a bad entry fails before any conversion work.
        if code not in DTYPES:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} (dtype {code!r} is not supported)")
        need = math.prod(shape) * DTYPES[code].itemsize
        if stop - start != need:
            raise CheckpointError(
                f"{path}: cannot read tensor {name!r} (shape {shape} of {code} needs {need} bytes, "
                f"its header gives it {stop - start})"
            )
    return header, 8 + length, metadata


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header ({name: {dtype, shape, data_offsets}})."""
    return _parse_header(Path(path))[0]


def _read_into(f, out: np.ndarray, offset: int, path: Path, name: str) -> np.ndarray:
    """Fill `out` (C-contiguous) with the bytes of the open file `f` from `offset`."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(offset)
    done = 0
    while done < len(view):  # one read() returns at most ~2 GB on Linux
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} (file ends {len(view) - done} bytes early)")
        done += n
    return out


class SafetensorsFile:
    """One safetensors file: header entries and `read(name)` into a fresh numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self._data_start, metadata = _parse_header(self.path)
        try:  # {name: CRC32} where the writer recorded them (jaxmoe's own checkpoints)
            self.checksums = {k[len(CHECKSUM_PREFIX) :]: int(v, 16) for k, v in metadata.items()
                              if k.startswith(CHECKSUM_PREFIX)}  # fmt: skip
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.path}: unreadable checksums in its header metadata") from None
        self._file = None

    def read(self, name: str) -> np.ndarray:
        """The tensor, checked against its recorded CRC32 where the file has one."""
        entry = self.entries[name]  # checked when the header was parsed
        out = np.empty(tuple(entry["shape"]), DTYPES[entry["dtype"]])
        if self._file is None:
            self._file = self.path.open("rb", buffering=0)
        _read_into(self._file, out, self._data_start + int(entry["data_offsets"][0]), self.path, name)
        want = self.checksums.get(name)
        if want is not None and (got := zlib.crc32(memoryview(out.reshape(-1).view(np.uint8)))) != want:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is damaged (CRC32 {got:08x}, written as {want:08x}): the file "
                "changed after jaxmoe wrote it. Restore the checkpoint from where it came from, or write it "
                "again (scripts/convert_hf.py for a converted model, scripts/quantize.py for a quantized one)"
            )
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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

    Use as a context manager so the files are closed.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        single, index = self.directory / WEIGHTS, self.directory / INDEX
        if single.is_file():
            self.source, paths = single, [single]
            weight_map = None
        elif index.is_file():
            self.source, weight_map = index, _read_index(index)
            paths = [self.directory / shard for shard in sorted(set(weight_map.values()))]
            for p in paths:
                if not p.is_file():
                    raise CheckpointError(f"{index}: names shard {p.name!r}, which is not in {self.directory}")
        else:
            raise CheckpointError(
                f"{self.directory}: no {WEIGHTS} or {INDEX} (only safetensors checkpoints are supported)"
            )

        self._file: dict[str, SafetensorsFile] = {}
        for p in paths:
            shard = SafetensorsFile(p)
            # Data-offset order: reading the names in turn walks each file front to back.
            for name, _ in sorted(shard.entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self._file:
                    raise CheckpointError(f"{p}: tensor {name!r} is also in {self._file[name].path}")
                self._file[name] = shard
        for name, shard in (weight_map or {}).items():
            found = self._file.get(name)
            if found is None or found.path != self.directory / shard:
                where = f"it is in {found.path.name!r}" if found else "no shard has it"
                raise CheckpointError(f"{index}: lists tensor {name!r} in {shard!r}, but {where}")

    @property
    def names(self) -> list[str]:
        return list(self._file)

    def file_of(self, name: str) -> Path:
        return self._file[name].path

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._file[name].entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        return self._file[name].read(name)

    def close(self) -> None:
        for shard in set(self._file.values()):
            shard.close()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
