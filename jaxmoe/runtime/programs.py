"""Ahead-of-time compiled programs, one per (name, static arguments, argument shapes).

Lowering and compiling explicitly (`jax.jit(f).lower(...).compile()`) keeps
compilation out of the timed path and makes "no recompile within a bucket"
checkable: the number of programs only grows when a new shape appears.

With `enable_compilation_cache` the compiled programs also persist on disk (JAX's
persistent compilation cache), so a second process start loads them instead of
compiling; `Programs.cache_hits` counts the programs that came from disk.

Every program carries its own name (`jit_attend_route`, not `jit__lambda_`): it is
the HLO module name a profiler shows, so a trace says which program ran.

Every program is compiled without excess precision: XLA may otherwise keep bf16
intermediates in f32 inside a fused program, so the same math split into several
programs (the offloaded prefill's per-layer programs, a decode resumed at a missed layer)
would round differently from one whole-model program and could change a token.
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Callable

import jax

COMPILER_OPTIONS = {"xla_allow_excess_precision": False}
CACHE_ENV = "JAXMOE_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "jaxmoe" / "xla"
_disk_hits = 0


def _count_hits(event: str, **_) -> None:
    global _disk_hits
    if event == "/jax/compilation_cache/cache_hits":
        _disk_hits += 1


jax.monitoring.register_event_listener(_count_hits)


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Keep compiled programs in `path`, else $JAXMOE_COMPILATION_CACHE ("off" disables),
    else ~/.cache/jaxmoe/xla. Returns the directory in use, or None when disabled."""
    if path is None:
        path = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_DIR))
    if str(path).lower() in ("", "off", "0", "none"):
        return None
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program is worth keeping: a small one (a prefill layer, a cache fetch) compiles in
    # well under the default 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def program_name(name) -> str:
    """A clean identifier from a program key: its string part ("attend_route" from
    ("attend_route", graphdef)), anything else replaced by underscores."""
    if isinstance(name, tuple):
        name = next((n for n in name if isinstance(n, str)), "program")
    return re.sub(r"\W+", "_", str(name)).strip("_") or "program"


def named(fn: Callable, name: str) -> Callable:
    """`fn` under `name`: jit takes the module name from `__name__`. The wrapper keeps
    fn's signature (static and donated arguments are resolved by name through it) and
    its source location in the debug info."""

    @functools.wraps(fn)
    def program(*args, **kwargs):
        return fn(*args, **kwargs)

    program.__name__ = program.__qualname__ = name
    return program


class Programs:
    def __init__(self):
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self.cache_hits = 0  # programs loaded from the persistent compilation cache

    def __len__(self) -> int:
        return len(self._compiled)

    def get(
        self, name, fn: Callable, static: dict, donate: tuple[int | str, ...], *args, options: dict | None = None
    ) -> jax.stages.Compiled:
        """The compiled `fn(*args, **static)`; `static` values must be hashable; `donate`
        names arguments by position or by name (their buffers are reused for outputs);
        `options`: compiler options on top of COMPILER_OPTIONS."""
        leaves, structure = jax.tree.flatten(args)
        key = (name, tuple(sorted(static.items())), structure, tuple((a.shape, a.dtype) for a in leaves))
        if key not in self._compiled:
            start, hits = time.perf_counter(), _disk_hits
            jitted = jax.jit(
                named(fn, program_name(name)),
                static_argnames=tuple(static),
                donate_argnums=tuple(d for d in donate if isinstance(d, int)),
                donate_argnames=tuple(d for d in donate if isinstance(d, str)),
            )
            compiler_options = {**COMPILER_OPTIONS, **(options or {})}
            self._compiled[key] = jitted.lower(*args, **static).compile(compiler_options=compiler_options)
            self.compile_seconds += time.perf_counter() - start
            self.cache_hits += _disk_hits - hits
        return self._compiled[key]
