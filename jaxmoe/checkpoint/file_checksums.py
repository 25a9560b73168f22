"""CRC32 checksums of the files under a directory, for checkpoints whose format carries none of
its own (a trained predictor's Orbax `params/`): written beside them at save, verified before
they are read, so a damaged file is refused by name instead of loading silently."""

from __future__ import annotations

import zlib
from pathlib import Path

from jaxmoe.checkpoint.assemble import CheckpointError

CHUNK = 1 << 22


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def directory_checksums(root: str | Path) -> dict[str, int]:
    """{path relative to `root`: CRC32} of every file under `root`."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_crc32(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_checksums(root: str | Path, want: dict[str, int], redo: str) -> None:
    """CheckpointError naming the first file under `root` that is missing or whose CRC32 differs
    from `want`; `redo` says how to get an intact copy."""
    root = Path(root)
    for name, crc in want.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint is incomplete); {redo}")
        if file_crc32(path) != crc:
            raise CheckpointError(f"{path}: damaged (its CRC32 differs from the one written with it); {redo}")
