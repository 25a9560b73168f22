"""Pinned host -> device bandwidth of `jax.device_put`, measured the way the expert cache copies.

The offload bound (issue 4) divides the bytes a decode step must move by this
bandwidth, so it is measured in the same run, on the same device, with arrays
shaped like one expert (one contiguous buffer of its bytes, as the host store keeps it):
one expert per call, and one layer's decode demand (`batched` experts) in one
call, which is what the cache issues for a layer's misses.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def _copy_seconds(host: list, target, repeats: int) -> float:
    """Median wall time of one `device_put` of `host` to `target`, until the bytes have landed."""
    jax.block_until_ready(jax.device_put(host, target))  # warm-up: first-use costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.device_put(host, target)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        del out  # free the copy before the next, so every copy allocates the same way
    return statistics.median(times)


def measure(expert_bytes: int, batched: int, repeats: int = 20, seed: int = 0) -> dict:
    """{"expert_bytes", "one_expert_ms", "one_expert_GBps", "batched_experts", "batched_ms", "batched_GBps"}."""
    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    rng = np.random.default_rng(seed)

    def expert():  # one contiguous buffer, as the host store keeps an expert
        return jax.device_put(rng.integers(0, 256, expert_bytes, dtype=np.uint8), pinned)

    experts = [expert() for _ in range(batched)]
    jax.block_until_ready(experts)
    nbytes = experts[0].size
    one = _copy_seconds([experts[0]], device, repeats)
    many = _copy_seconds(experts, device, max(5, repeats // 2))
    return {
        "expert_bytes": nbytes,
        "one_expert_ms": 1e3 * one,
        "one_expert_GBps": nbytes / one / 1e9,
        "batched_experts": batched,
        "batched_ms": 1e3 * many,
        "batched_GBps": batched * nbytes / many / 1e9,
        "memory_kinds": [m.kind for m in dev.addressable_memories()],
        "source_memory_kind": experts[0].sharding.memory_kind,
    }
