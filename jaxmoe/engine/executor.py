"""Running an engine's modules as compiled programs: one named program cache per engine.

A module goes in split (`Piece`: its graphdef and its weights as a flat tuple of arrays),
so a call hands over a tuple instead of flattening a module every time; modules with
equal graphdefs (layers of one kind) share one compiled program per argument shape.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jaxmoe.engine.phases import PhaseClock
from jaxmoe.engine.programs import Programs
from jaxmoe.model import MoEDecoder


class Ends(nnx.Module):
    """Embedding, final norm and LM head: the model minus its layers (shared, not copied)."""

    def __init__(self, model: MoEDecoder):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.lm_head = model.lm_head


class Piece:
    """A module split for per-call speed: graphdef, and its weights as a flat tuple of arrays."""

    def __init__(self, module: nnx.Module):
        self.graphdef, state = nnx.split(module)
        leaves, self.treedef = jax.tree.flatten(state)
        self.leaves = tuple(leaves)

    def merge(self, leaves) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


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
                options=None) -> jax.stages.Compiled:  # fmt: skip
        """The compiled program `run` calls; `args` may be jax.ShapeDtypeStructs (compile only)."""
        signature = (name, id(piece.graphdef), tuple(static.items()))
        signature += tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        program = self._by_signature.get(signature)
        if program is None:

            def bound(leaves, *a, **kw):  # Programs.get names the program after `name`
                return fn(piece.merge(leaves), *a, **kw)

            donate = tuple(i + 1 for i in donate)  # after the leaves
            program = self.programs.get(
                (name, piece.graphdef), bound, static, donate, piece.leaves, *args, options=options
            )
            self._by_signature[signature] = program
        return program

    def compiled(self, name: str) -> list[jax.stages.Compiled]:
        """Every distinct program compiled under `name` (one per shape signature)."""
        return list({id(p): p for key, p in self._by_signature.items() if key[0] == name}.values())
