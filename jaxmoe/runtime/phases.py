"""Where an offloaded step's time goes: host wall time per phase and, when asked, device time.

The offloaded engine marks its phases (`dispatch` of a program, `host_read` of a
result, `schedule` planning, `copy_issue` of a `device_put`, `copy_wait` for demand
copies) with `clock.phase(name)`, and hands what it just dispatched or copied to
`clock.device(kind, arrays)`. A clock that is off costs one attribute test per mark.

`sync=True` turns the measurement around: after every program and every copy the
host blocks until the device is done, so `compute` and `copy` become each one's own
device time (nothing overlaps any more; the step gets slower). The natural run says
what the host does and waits for; the synced run says what the device work costs.
"""

from __future__ import annotations

import collections
import contextlib
import time

import jax

HOST_PHASES = ("dispatch", "host_read", "schedule", "copy_issue", "copy_wait")
DEVICE_PHASES = ("compute", "copy")


class _Span:
    __slots__ = ("clock", "name", "start")

    def __init__(self, clock: "PhaseClock", name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.add(self.name, time.perf_counter() - self.start)


_OFF = contextlib.nullcontext()


class PhaseClock:
    def __init__(self, enabled: bool = False, sync: bool = False):
        self.enabled, self.sync = enabled, sync
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)

    def phase(self, name: str):
        return _Span(self, name) if self.enabled else _OFF

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.counts[name] += 1

    def device(self, kind: str, arrays) -> None:
        """With sync: block until `arrays` (just dispatched or copied) are ready, counted as `kind`."""
        if self.enabled and self.sync:
            start = time.perf_counter()
            jax.block_until_ready(arrays)
            self.add(kind, time.perf_counter() - start)

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def per_step(self, steps: int) -> dict:
        """{phase: {"ms": per step, "calls": per step}} over `steps` steps."""
        return {k: {"ms": 1e3 * v / steps, "calls": self.counts[k] / steps} for k, v in sorted(self.seconds.items())}
