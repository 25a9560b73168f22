"""The continuous batch's KV cache: rows of requests at their own positions, resized
between a few static (rows, length) buckets so arrivals and departures never compile
a new program once each bucket has been seen.

A row's cache entries beyond its own position are never visible to it (attention masks
key s > position per row), so a row taken over by a new request needs no clearing, and
rows can be gathered, padded or truncated freely as long as every live row's own length
fits.

Shapes: B rows, S cache length, Hk key/value heads, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.buckets import bucket
from jaxmoe.model.decoder import LayerKV


def row_buckets(max_rows: int) -> list[int]:
    """Powers of two up to max_rows, and max_rows itself."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return sizes + [max_rows]


def rows_bucket(rows: int, max_rows: int) -> int:
    return min(bucket(rows, 1), max_rows)


def kv_windows(cfg) -> tuple[int, ...]:
    """Per layer, the sliding window its cache is a ring of (0: a full layer); () for no config."""
    if cfg is None:
        return ()
    return tuple(cfg.sliding_window if cfg.is_sliding(i) else 0 for i in range(cfg.num_layers))


def resize(kv, index: jax.Array, *, length: int, windows: tuple[int, ...] = ()):
    """Rows `index` [B'] of every layer's cache, cut or zero-padded to `length` keys; a
    sliding layer (windows[l] > 0) to min(length, window) (its ring: position p in slot
    p mod slots, so a ring only grows or shrinks while it holds every position, where
    cutting or padding keeps each key in its slot)."""

    def fit(a, keys):
        a = a[index]
        if a.shape[1] >= keys:
            return a[:, :keys]
        return jnp.pad(a, ((0, 0), (0, keys - a.shape[1]), (0, 0), (0, 0)))

    windows = windows or (0,) * len(kv)
    keys = [min(length, w) if w else length for w in windows]
    return tuple(LayerKV(fit(layer.k, n), fit(layer.v, n)) for layer, n in zip(kv, keys, strict=True))


def insert(kv, row_kv, row: jax.Array):
    """One request's prefilled cache row_kv [1, S_row] into row `row` of kv [B, S >= S_row]."""
    at = lambda a, r: jax.lax.dynamic_update_slice(a, r, (row, 0, 0, 0))  # noqa: E731
    return tuple(LayerKV(at(layer.k, r.k), at(layer.v, r.v)) for layer, r in zip(kv, row_kv, strict=True))


class BatchKV:
    """The batch cache on the device and which request (slot id) each row holds."""

    def __init__(self, programs, max_rows: int, windows: tuple[int, ...] = ()):
        self.programs, self.max_rows = programs, max_rows
        self.windows = windows  # per layer: its sliding window (0: full), see resize
        self._length = 0  # keys per row of a full layer (a sliding layer may keep fewer)
        self.kv = None  # tuple of LayerKV [B, S]
        self.holders: list = []  # per row: the request holding it, or None

    @property
    def rows(self) -> int:
        return len(self.holders)

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self._length

    def live(self) -> list[int]:
        return [r for r, h in enumerate(self.holders) if h is not None]

    def requests(self) -> list:
        """The live rows' holders, in row order."""
        return [h for h in self.holders if h is not None]

    def _resize(self, order: list[int], rows: int, length: int) -> None:
        index = np.zeros(rows, np.int32)
        index[: len(order)] = order
        index = jnp.asarray(index)
        program = self.programs.get("kv_resize", resize, {"length": length, "windows": self.windows}, (), self.kv, index)
        self.kv, self._length = program(self.kv, index), length
        self.holders = [self.holders[r] for r in order] + [None] * (rows - len(order))

    def fit(self, live_rows: int, length: int, new_kv) -> None:
        """Make room for `live_rows` rows of `length` keys (a cache bucket: every row's own
        length is one). Grows at once; shrinks, packing the live rows at the front, only
        when a quarter of the rows or of the length would do, so a batch hovering at a
        bucket's edge does not copy its cache back and forth every step."""
        rows = rows_bucket(max(live_rows, 1), self.max_rows)
        if self.kv is None:
            self.kv, self.holders, self._length = new_kv(rows, length), [None] * rows, length
            return
        rows = rows if rows > self.rows or rows <= self.rows // 4 else self.rows
        length = length if length > self.length or length <= self.length // 4 else self.length
        if (rows, length) != (self.rows, self.length):
            self._resize(self.live(), rows, length)

    def put(self, holder, row_kv) -> int:
        """The first free row takes `holder` and its prefilled cache; returns the row."""
        row = self.holders.index(None)
        r = jnp.int32(row)
        program = self.programs.get("kv_insert", insert, {}, (0,), self.kv, row_kv, r)
        self.kv = program(self.kv, row_kv, r)
        self.holders[row] = holder
        return row

    def free(self, row: int) -> None:
        self.holders[row] = None
