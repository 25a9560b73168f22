"""The figures a row is judged by: per-token latency percentiles, the bound
`max(compute, transfer)`, and achieved host -> device bandwidth. Pure functions of numbers.
"""

from __future__ import annotations

import numpy as np


def step_latencies_ms(stamps: list[float]) -> list[float]:
    """Per decode step: the time between consecutive token timestamps (seconds in, ms out).
    The first stamp is the prefill's token, so the first interval is the first decode step."""
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]


def latency_summary(runs: list[list[float]]) -> dict:
    """p50 / p99 / max of per-step latencies pooled over the timed runs (linear interpolation)."""
    pooled = [x for run in runs for x in run]
    if not pooled:
        return {"tpot_p50_ms": None, "tpot_p99_ms": None, "tpot_max_ms": None, "latency_samples": 0}
    p50, p99 = np.percentile(pooled, [50, 99])
    return {"tpot_p50_ms": float(p50), "tpot_p99_ms": float(p99), "tpot_max_ms": max(pooled),
            "latency_samples": len(pooled)}  # fmt: skip


def transfer_ms(num_bytes: float | None, gbps: float | None) -> float | None:
    """Time to move `num_bytes` at `gbps` (10^9 bytes per second)."""
    if num_bytes is None or not gbps:
        return None
    return num_bytes / (gbps * 1e9) * 1e3


def bound(compute_ms: float | None, transfer: float | None) -> dict:
    """What a step can at best take: max(compute, transfer) when copies overlap compute, and the
    serial sum when they do not. Without a compute figure (the model does not fit resident) the
    transfer alone is the bound, a lower one."""
    if transfer is None:
        return {"bound_ms": compute_ms, "bound_by": "compute" if compute_ms is not None else None,
                "serial_bound_ms": compute_ms}  # fmt: skip
    if compute_ms is None:
        return {"bound_ms": transfer, "bound_by": "transfer (compute not measured)", "serial_bound_ms": None}
    by = "transfer" if transfer >= compute_ms else "compute"
    return {"bound_ms": max(compute_ms, transfer), "bound_by": by, "serial_bound_ms": compute_ms + transfer}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def achieved_gbps(num_bytes: float | None, seconds: float | None) -> float | None:
    """Bytes moved over the wall time they were moved in (10^9 bytes per second)."""
    if not num_bytes or not seconds:
        return None
    return num_bytes / seconds / 1e9
