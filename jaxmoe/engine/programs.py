"""Ahead-of-time compiled programs, one per (name, static arguments, argument shapes).

Lowering and compiling explicitly (`jax.jit(f).lower(...).compile()`) keeps
compilation out of the timed path and makes "no recompile within a bucket"
checkable: the number of programs only grows when a new shape appears.

Every program is compiled without excess precision: XLA may otherwise keep bf16
intermediates in f32 inside a fused program, so the same math split into several
programs (the offloaded engine's per-layer calls) would round differently from
one whole-model program and could change a token.
"""

from __future__ import annotations

import time
from typing import Callable

import jax

COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


class Programs:
    def __init__(self):
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0

    def __len__(self) -> int:
        return len(self._compiled)

    def get(self, name, fn: Callable, static: dict, donate: tuple[int | str, ...], *args) -> jax.stages.Compiled:
        """The compiled `fn(*args, **static)`; `static` values must be hashable; `donate`
        names arguments by position or by name (their buffers are reused for outputs)."""
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), args)
        key = (name, tuple(sorted(static.items())), jax.tree.structure(args), tuple(jax.tree.leaves(shapes)))
        if key not in self._compiled:
            start = time.perf_counter()
            jitted = jax.jit(
                fn,
                static_argnames=tuple(static),
                donate_argnums=tuple(d for d in donate if isinstance(d, int)),
                donate_argnames=tuple(d for d in donate if isinstance(d, str)),
            )
            self._compiled[key] = jitted.lower(*args, **static).compile(compiler_options=COMPILER_OPTIONS)
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]
