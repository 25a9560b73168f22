"""Routing traces on disk: chunked .npz files plus a manifest, written crash-safely.

A trace set is a directory:
  manifest.json     settings (model summary, text, window, projection), token_count,
                    complete, and the list of finished chunks
  chunk-00000.npz   tokens [n] int32, positions [n] int32 (within its window),
                    inputs [n, Lm, P] float16  router input at each MoE layer
                                               (P = hidden size, or the projection dim),
                    ids    [n, Lm, K] uint8 (int16 past 256 experts)  top-k experts, descending,
                    probs  [n, Lm, E] float16  the router's full softmax over experts
  projection.npy    [D, P] float32, only with a projection
Lm is the number of MoE layers (in order). A chunk is written to a temporary file
and renamed before the manifest that lists it is rewritten (itself via a temporary
file and a rename), so a crash leaves at worst an unlisted chunk, which a resumed
run writes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
PROJECTION = "projection.npy"
VERSION = 1
ARRAYS = ("tokens", "positions", "inputs", "ids", "probs")
# Fields of the manifest that are results, not settings: they may differ on resume.
_RESULT_FIELDS = {"chunks", "token_count", "complete"}


class TraceError(ValueError):
    """A trace directory that cannot be used as asked; the message names the field or file."""


def _write_atomic(path: Path, write) -> None:
    """Call write(file object) on a temporary sibling, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.npz"


def random_projection(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """A fixed Gaussian map [D, P] scaled by 1/sqrt(P) (approximately norm-preserving)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def ids_dtype(num_experts: int):
    return np.uint8 if num_experts <= 256 else np.int16


class TraceWriter:
    """Creates or resumes a trace directory whose settings equal `settings`."""

    def __init__(self, out: str | Path, settings: dict, projection: np.ndarray | None = None):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MANIFEST
        if path.is_file():
            old = json.loads(path.read_text())
            for key in sorted(set(old) | set(settings)):
                if key in _RESULT_FIELDS:
                    continue
                if old.get(key) != settings.get(key):
                    raise TraceError(
                        f"{path}: traces were collected with {key}={old.get(key)!r}, this run has "
                        f"{key}={settings.get(key)!r}; use another --out or remove the directory"
                    )
            self.manifest = old
            # A chunk listed but missing on disk is written again.
            self.manifest["chunks"] = [c for c in old["chunks"] if (self.dir / c["file"]).is_file()]
        else:
            self.manifest = {**settings, "chunks": [], "token_count": 0, "complete": False}
        if projection is not None and not (self.dir / PROJECTION).is_file():
            _write_atomic(self.dir / PROJECTION, lambda f: np.save(f, projection))
        self._write_manifest()

    def done(self, index: int) -> bool:
        return any(c["index"] == index for c in self.manifest["chunks"])

    def write_chunk(self, index: int, first_token: int, arrays: dict[str, np.ndarray]) -> None:
        missing = set(ARRAYS) - set(arrays)
        if missing:
            raise TraceError(f"chunk {index}: missing arrays {sorted(missing)}")
        name = chunk_name(index)
        _write_atomic(self.dir / name, lambda f: np.savez(f, **{k: arrays[k] for k in ARRAYS}))
        digest = hashlib.sha256((self.dir / name).read_bytes()).hexdigest()[:16]
        n = int(arrays["tokens"].shape[0])
        chunks = [c for c in self.manifest["chunks"] if c["index"] != index]
        chunks.append({"index": index, "file": name, "first_token": first_token, "tokens": n, "sha256": digest})
        self.manifest["chunks"] = sorted(chunks, key=lambda c: c["index"])
        self._write_manifest()

    def finish(self, total_chunks: int) -> dict:
        self.manifest["complete"] = len(self.manifest["chunks"]) == total_chunks
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        self.manifest["token_count"] = sum(c["tokens"] for c in self.manifest["chunks"])
        blob = json.dumps(self.manifest, indent=1).encode()
        _write_atomic(self.dir / MANIFEST, lambda f: f.write(blob))


class TraceSet:
    """Read a trace directory: its manifest and token ranges of its arrays."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.dir = Path(path)
        file = self.dir / MANIFEST
        if not file.is_file():
            raise TraceError(f"{self.dir}: no {MANIFEST} (collect traces with scripts/collect_traces.py)")
        self.manifest = json.loads(file.read_text())
        if self.manifest.get("version") != VERSION:
            raise TraceError(f"{file}: version={self.manifest.get('version')!r}, expected {VERSION}")
        if not self.manifest["complete"] and not allow_incomplete:
            raise TraceError(
                f"{file}: complete=false ({len(self.manifest['chunks'])} chunks written); "
                "run collect_traces.py again with the same arguments to finish it"
            )
        self.chunks = self.manifest["chunks"]
        expected = 0
        for c in self.chunks:
            if c["first_token"] != expected:
                raise TraceError(f"{file}: chunk {c['file']} starts at token {c['first_token']}, expected {expected}")
            expected += c["tokens"]
        self.token_count = expected

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def fingerprint(self) -> str:
        """Identifies these exact traces (settings and chunk contents)."""
        blob = json.dumps({k: v for k, v in self.manifest.items() if k != "complete"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def projection(self) -> np.ndarray | None:
        proj = self.manifest.get("projection")
        return None if proj is None else np.load(self.dir / PROJECTION)

    def load(self, start: int = 0, stop: int | None = None, fields=ARRAYS) -> dict[str, np.ndarray]:
        """Arrays of tokens [start, stop) concatenated over chunks."""
        stop = self.token_count if stop is None else min(stop, self.token_count)
        parts: dict[str, list] = {k: [] for k in fields}
        for c in self.chunks:
            a, b = c["first_token"], c["first_token"] + c["tokens"]
            if b <= start or a >= stop:
                continue
            with np.load(self.dir / c["file"]) as z:
                for k in fields:
                    parts[k].append(z[k][max(start, a) - a : min(stop, b) - a])
        if not parts[fields[0]]:
            raise TraceError(f"{self.dir}: no tokens in [{start}, {stop})")
        return {k: np.concatenate(v) for k, v in parts.items()}
