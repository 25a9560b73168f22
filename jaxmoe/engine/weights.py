"""Dense weights as a few device buffers: a program takes a handful of weight arguments, not
one per array.

A call of a compiled program costs host time per argument (about 4.8 us each on an H200,
measured on a trivial program), and the decode step of OLMoE-1B-7B took 147 weight arrays.
Here every dense weight is a block of rows of one 2-D buffer per (dtype, last dimension):
weight [..., W] is rows [r, r + prod(...)) of a buffer [R, W]. A program views it by a slice
of rows and a reshape of the leading dimensions (`WeightPack.view_at`), which XLA fuses into
the kernel that reads the weight, so nothing is copied. The rows keep the weight's last
dimension minor: from a flat buffer XLA moved a one-row product's multiply ahead of the
reshape and then wrote the product out (deviceless H100 compile). The first rows are an
argument too (a dynamic slice), so the layers of one kind share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Larger arrays stay arrays of their own: XLA multiplies a matrix past 10M elements (its
# threshold for computing a one-row product as a reduction) with a GEMM kernel, which reads
# an operand that is a slice only after copying it (the LM head: 206 MB a step, measured in
# the deviceless H100 compile of the packed step).
LOOSE_ELEMENTS = 10_000_000


@dataclasses.dataclass(frozen=True)
class Slot:
    buffer: int  # which of the pack's arguments
    row: int  # its first row in that buffer; -1: the argument is the array itself
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if self.shape else 1


def _width(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer: jax.Array, array: jax.Array, row: jax.Array) -> jax.Array:
    """buffer [R, W] with `array` [..., W] as rows from `row`, in place (the buffer is donated)."""
    block = array.reshape(-1, buffer.shape[1]).astype(buffer.dtype)
    return jax.lax.dynamic_update_slice(buffer, block, (row, jnp.int32(0)))


class WeightPack:
    """`arrays` (a model's dense weights, on one device) copied into one buffer per (dtype,
    last dimension), but for those past LOOSE_ELEMENTS, which are passed as they are.
    `arguments`: the buffers, then the loose arrays. `consume`: each array is deleted once
    copied, so the device never holds the weights twice (for a caller that owns the model: it
    must not use it afterwards); otherwise the pack is a second copy beside the model's
    arrays. Abstract `arrays` (jax.ShapeDtypeStruct: a compile-only program) give abstract
    buffers."""

    def __init__(self, arrays: Sequence[jax.Array], consume: bool = False):
        groups: dict[tuple[jnp.dtype, int], int] = {}  # (dtype, width) -> buffer
        rows: list[int] = []
        self.slots: list[Slot] = []
        self._slot_of: dict[int, int] = {}
        loose = [a for a in arrays if a.size > LOOSE_ELEMENTS]
        packed = [a for a in arrays if a.size <= LOOSE_ELEMENTS]
        for a in packed:
            b = groups.setdefault((jnp.dtype(a.dtype), _width(tuple(a.shape))), len(groups))
            if b == len(rows):
                rows.append(0)
            self._slot_of[id(a)] = len(self.slots)
            self.slots.append(Slot(b, rows[b], tuple(a.shape)))
            rows[b] += self.slots[-1].rows
        for i, a in enumerate(loose):
            self._slot_of[id(a)] = len(self.slots)
            self.slots.append(Slot(len(groups) + i, -1, tuple(a.shape)))
        shapes = [((n, width), dtype) for ((dtype, width), _), n in zip(sorted(groups.items(), key=lambda g: g[1]), rows)]
        if not all(isinstance(a, jax.Array) for a in arrays):
            self.arguments = tuple(jax.ShapeDtypeStruct(shape, d) for shape, d in shapes) + tuple(loose)
            return
        device = arrays[0].sharding if arrays else None
        buffers = [jnp.zeros(shape, d, device=device) for shape, d in shapes]
        for a, slot in zip(packed, self.slots):
            buffers[slot.buffer] = _write(buffers[slot.buffer], a, jnp.int32(slot.row))
            if consume:
                a.delete()
        self.arguments = tuple(buffers) + tuple(loose)

    def slots_of(self, arrays: Sequence[jax.Array]) -> tuple[Slot, ...]:
        """The slots of `arrays`, which must be among those the pack was built from (the same
        objects: a sub-module's weights are found by identity)."""
        try:
            return tuple(self.slots[self._slot_of[id(a)]] for a in arrays)
        except KeyError:
            raise ValueError("an array that is not among the packed weights") from None

    @staticmethod
    def view_at(arguments: Sequence[jax.Array], slots: Sequence[Slot], rows: jax.Array) -> list[jax.Array]:
        """Inside a program: the arrays at `slots` of `arguments` (the pack's, passed in), each
        from its first row in `rows` [len(slots)] int32, an argument too, so one program serves
        every set of slots of the same buffers and shapes (layers of one kind)."""
        return [arguments[s.buffer] if s.row < 0 else
                jax.lax.dynamic_slice(arguments[s.buffer], (rows[i], 0), (s.rows, _width(s.shape))).reshape(s.shape)
                for i, s in enumerate(slots)]  # fmt: skip
