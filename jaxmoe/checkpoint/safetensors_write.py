"""Write a safetensors file one tensor at a time.

Every tensor's name, shape and dtype are declared up front, so the header (and each
tensor's place in the file) is known before any data exists; tensors are then
written in any order and only the one being written is in memory. Used for jaxmoe's
own checkpoints and for exports to Hugging Face.

`checksums=True` (jaxmoe's own checkpoints) records each tensor's CRC32 in the header's
metadata (`crc32:<name>`, 8 hex digits), so a reader can tell a damaged tensor from a
good one. A tensor's checksum is known only once it is written, and the header comes
first: it is written with placeholders of the same width and rewritten in place when
the file closes, so no tensor moves.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np

from jaxmoe.checkpoint.assemble import CheckpointError, name_list
from jaxmoe.checkpoint.safetensors_io import CHECKSUM_PREFIX, DTYPES

_CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsWriter:
    """`write(name, value)` each tensor of `specs` ({name: (shape, dtype)}), then `close()`.

    Closing checks that every declared tensor was written; on an error the file is
    left incomplete, so write it inside an `atomic_directory`.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]], metadata=None,
                 checksums: bool = False):  # fmt: skip
        self.path = Path(path)
        self._crc = {name: 0 for name in specs} if checksums else None
        self._specs, self._offset, header = {}, {}, {}
        end = 0
        for name, (shape, dtype) in specs.items():
            shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
            if dtype not in _CODES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
            start, end = end, end + math.prod(shape) * dtype.itemsize
            self._specs[name], self._offset[name] = (shape, dtype), start
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        self._metadata, self._tensors = dict(metadata or {}), header
        raw = self._header()
        self._data_start = 8 + len(raw)
        self._unwritten = set(self._specs)
        self._file = self.path.open("wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._file.truncate(self._data_start + end)

    def _header(self) -> bytes:
        metadata = dict(self._metadata)
        if self._crc is not None:
            metadata.update({CHECKSUM_PREFIX + name: f"{crc:08x}" for name, crc in self._crc.items()})
        header = {"__metadata__": metadata, **self._tensors} if metadata else self._tensors
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it

    def write(self, name: str, value) -> None:
        if name not in self._specs:
            raise CheckpointError(f"{self.path}: tensor {name!r} was not declared")
        value = np.asarray(value)
        if (value.shape, value.dtype) != self._specs[name]:
            shape, dtype = self._specs[name]
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {value.dtype}{list(value.shape)}, declared {dtype}{list(shape)}"
            )
        data = memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        self._file.seek(self._data_start + self._offset[name])
        self._file.write(data)
        if self._crc is not None:
            self._crc[name] = zlib.crc32(data)
        self._unwritten.discard(name)

    def close(self) -> None:
        if self._file.closed:
            return
        if self._crc is not None and not self._unwritten:
            raw = self._header()  # the same length: every checksum is 8 hex digits
            assert len(raw) == self._data_start - 8
            self._file.seek(8)
            self._file.write(raw)
        self._file.close()
        if self._unwritten:
            raise CheckpointError(f"{self.path}: tensors never written: {name_list(sorted(self._unwritten))}")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()  # the caller's error is the one to report
