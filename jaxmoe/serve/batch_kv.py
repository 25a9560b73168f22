"""The continuous batch's KV cache: rows of requests at their own positions, resized
between a few static (rows, length) buckets so arrivals and departures never compile
a new program once each bucket has been seen.

A row's cache entries beyond its own position are never visible to it (attention masks
key s > position per row), so a row taken over by a new request needs no clearing, and
rows can be gathered, padded or truncated freely as long as every live row's own length
fits.

Shapes: B rows, S cache length. The cache is one stack per kind of layer (model/kv.py) of
whatever its attention keeps (k and v [Lk, B, S, Hk, Dh], a sliding layer's ring
[Lk, B, min(S, window), Hk, Dh], or MLA's latent and rope key [Lk, B, S, ...]): every leaf
has layers first, rows second and keys third, so it is resized and filled leaf by leaf, to
the shapes a fresh cache of the new length has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.runtime.buckets import bucket
from jaxmoe.model.kv import KEY_AXIS


def row_buckets(max_rows: int) -> list[int]:
    """Powers of two up to max_rows, and max_rows itself."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return sizes + [max_rows]


def rows_bucket(rows: int, max_rows: int) -> int:
    return min(bucket(rows, 1), max_rows)


def resize(kv, index: jax.Array, *, keys: tuple[int, ...]):
    """Rows `index` [B'] of every layer's cache, each leaf cut or zero-padded to its entry of
    `keys` (leaf order). A sliding layer's ring (position p in slot p mod R) is resized to the
    R a context gives, min(length, window): it grows or shrinks only while it holds every
    position, where cutting or padding keeps each key in its slot."""

    def fit(a, n):
        a = a[:, index]
        if a.shape[KEY_AXIS] >= n:
            return a[:, :, :n]
        return jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[KEY_AXIS])) + ((0, 0),) * (a.ndim - 3))

    leaves, tree = jax.tree.flatten(kv)
    return jax.tree.unflatten(tree, [fit(a, n) for a, n in zip(leaves, keys, strict=True)])


def insert(kv, row_kv, row: jax.Array):
    """One request's prefilled cache row_kv [Lk, 1, S_row] into row `row` of kv [Lk, B, S >= S_row]."""
    at = lambda a, r: jax.lax.dynamic_update_slice(a, r, (0, row) + (0,) * (a.ndim - 2))  # noqa: E731
    return jax.tree.map(at, tuple(kv), tuple(row_kv))


class BatchKV:
    """The batch cache on the device and which request (slot id) each row holds."""

    def __init__(self, programs, max_rows: int):
        self.programs, self.max_rows = programs, max_rows
        self._length = 0  # keys per row of a full layer (a sliding layer's ring may keep fewer)
        self.kv = None  # the cache's stacks, each leaf [Lk, B, S, ...]
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

    def _resize(self, order: list[int], rows: int, length: int, new_kv) -> None:
        index = np.zeros(rows, np.int32)
        index[: len(order)] = order
        index = jnp.asarray(index)
        # Each leaf's keys in a fresh cache of this length (a ring's: its window at most).
        keys = tuple(a.shape[KEY_AXIS] for a in jax.tree.leaves(jax.eval_shape(lambda: new_kv(rows, length))))
        program = self.programs.get("kv_resize", resize, {"keys": keys}, (), self.kv, index)
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
            self._resize(self.live(), rows, length, new_kv)

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
