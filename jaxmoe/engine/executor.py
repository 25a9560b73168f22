"""Running an engine's modules as compiled programs: one named program cache per engine.

A module goes in split (`Piece`: its graphdef and its weights as a flat tuple of arrays, or
as slots of the engine's WeightPack), so a call hands over a tuple instead of flattening a
module every time; modules with equal graphdefs (layers of one kind) share one compiled
program per argument shape.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.runtime.phases import PhaseClock
from jaxmoe.runtime.programs import Programs
from jaxmoe.engine.weights import WeightPack
from jaxmoe.model import MoEDecoder


class Ends(nnx.Module):
    """Embedding, final norm and LM head: the model minus its layers (shared, not copied)."""

    def __init__(self, model: MoEDecoder):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.lm_head = model.lm_head


class Piece:
    """A module split for per-call speed: its graphdef, and its weights, which a program takes
    as `leaves`: a flat tuple of the module's arrays, or with `pack` the pack's arguments and
    the first rows of this module's slots (`WeightPack.view_at`). Every piece of an engine then
    passes the same few arrays, every program views its weights the same way (a dynamic slice:
    XLA may round a product differently when one operand is a constant slice and another a
    dynamic one), and pieces of equal graphdefs (layers of one kind) share one compiled program."""

    def __init__(self, module: nnx.Module, pack: WeightPack | None = None):
        self.graphdef, state = nnx.split(module)
        leaves, self.treedef = jax.tree.flatten(state)
        self.pack = pack
        if pack is None:
            self._leaves, self.slots, self.layout = tuple(leaves), (), ()
            return
        self.slots = pack.slots_of(leaves)
        rows = np.array([slot.row for slot in self.slots], np.int32)
        abstract = not isinstance(pack.arguments[0], jax.Array)
        self._rows = jax.ShapeDtypeStruct(rows.shape, rows.dtype) if abstract else jnp.asarray(rows)
        # What a compiled program bakes in: which argument and shape each weight has.
        self.layout = tuple((s.buffer, s.row < 0, s.shape) for s in self.slots)

    @property
    def leaves(self) -> tuple:
        return self._leaves if self.pack is None else (*self.pack.arguments, self._rows)

    def merge(self, leaves, after: jax.Array | None = None) -> nnx.Module:
        """The module from `leaves`. `after`: a value its packed weights are viewed after (an
        optimization barrier ties the pack's buffers to it). A step merges each layer after
        that layer's input, so a product that copies a slice (XLA's GEMM does: a step of more
        than one row) copies one layer's weights when it runs: viewed all at once, the
        slices were one fusion copying every layer's weights into one temporary (537 MB for
        OLMoE-1B-7B at 8 rows, deviceless H100)."""
        if self.pack is None:
            arrays = leaves
        else:
            *arguments, rows = leaves
            if after is not None:
                arguments, _ = jax.lax.optimization_barrier((tuple(arguments), after))
            arrays = WeightPack.view_at(arguments, self.slots, rows)
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, arrays))


def pack_module(module: nnx.Module, consume: bool = False) -> WeightPack:
    """A module's weights packed (engine/weights.py); `consume`: its own arrays are freed."""
    return WeightPack(jax.tree.leaves(nnx.state(module)), consume=consume)


class Executor:
    def __init__(self):
        self.programs = Programs()
        self.clock = PhaseClock()  # the engine's, whoever replaces it
        self._by_signature: dict[tuple, jax.stages.Compiled] = {}

    def run(self, name: str, fn: Callable, static: dict, donate: tuple[int, ...], piece: Piece, *args, options=None):
        """`fn(module, *args, **static)` compiled for these shapes and called; `donate` are
        positions in `args` whose buffers the outputs reuse (the KV cache, the expert pool)."""
        program = self.compile(name, fn, static, donate, piece, *args, options=options)
        with self.clock.phase("dispatch"):
            out = program(piece.leaves, *args)
        self.clock.device("compute", out)
        return out

    def compile(self, name: str, fn: Callable, static: dict, donate: tuple[int, ...], piece: Piece, *args,
                options=None, lazy: bool = False) -> jax.stages.Compiled:  # fmt: skip
        """The compiled program `run` calls; `args` may be jax.ShapeDtypeStructs (compile only).
        `lazy`: `fn` takes, in place of the module, a function that merges it, for a program that
        reads weights inside conditionals (engine/step.py's `decode_step`)."""
        signature = (name, id(piece.graphdef), tuple(static.items()), lazy)
        signature += tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        program = self._by_signature.get(signature)
        if program is None:

            def bound(leaves, *a, **kw):  # Programs.get names the program after `name`
                return fn(functools.partial(piece.merge, leaves) if lazy else piece.merge(leaves), *a, **kw)

            donate = tuple(i + 1 for i in donate)  # after the leaves
            program = self.programs.get(
                (name, piece.graphdef, piece.layout, lazy), bound, static, donate, piece.leaves, *args, options=options
            )
            self._by_signature[signature] = program
        return program

    def compiled(self, name: str) -> list[jax.stages.Compiled]:
        """Every distinct program compiled under `name` (one per shape signature)."""
        return list({id(p): p for key, p in self._by_signature.items() if key[0] == name}.values())
