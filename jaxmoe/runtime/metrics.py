"""Memory accounting for metrics."""

from __future__ import annotations

import jax


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def device_peak_bytes(device=None) -> int | None:
    """Peak bytes in use on the device, where the backend reports it (GPU); None on CPU."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def fmt_bytes(n: float) -> str:
    """Bytes for messages: 12.6 MB, 5.37 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
