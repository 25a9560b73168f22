"""The device expert cache: the only place that moves expert bytes to the device.

Memory, all counted against the byte budget:
  pool     [S, D, 2I] and [S, I, D]: S cached experts, preallocated
  staging  up to M copies in flight: `device_put` cannot write into an existing
           buffer, so a copy lands in its own buffer and the next expert program
           scatters it into its pool slot
  filler   one zeroed expert that pads the staged list to its static length M
A budget of every expert (plus nothing in flight) preloads them all: no copies.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.metrics import fmt_bytes, tree_bytes
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.policy import EvictionPolicy
from jaxmoe.offload.schedule import PassPlan, Schedule


class BudgetError(ValueError):
    """An expert budget the cache cannot run with; the message states the minimum."""


@dataclasses.dataclass
class CacheCounters:
    expert_hits: int = 0
    expert_misses: int = 0
    h2d_bytes: int = 0
    stall_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    peak_bytes: int = 0  # pool + staging + filler, by the cache's own accounting

    @property
    def hit_rate(self) -> float | None:
        total = self.expert_hits + self.expert_misses
        return self.expert_hits / total if total else None


def plan_geometry(budget_bytes: int, expert_bytes: int, total_experts: int, unique_max: int) -> tuple[int, int]:
    """(pool slots S, staging M) for a budget, or BudgetError naming the minimum.

    A decode step of one layer needs up to `unique_max` experts resident at once,
    all possibly copied in that step: S >= unique_max and M = unique_max, plus the filler.
    """
    capacity = budget_bytes // expert_bytes
    if capacity >= total_experts:
        return total_experts, 0
    minimum = 2 * unique_max + 1
    if capacity < minimum:
        raise BudgetError(
            f"expert budget {fmt_bytes(budget_bytes)} is below the minimum working set of "
            f"{fmt_bytes(minimum * expert_bytes)}: {unique_max} experts one layer can need for this batch, "
            f"as many staging buffers and one filler, at {fmt_bytes(expert_bytes)} each"
        )
    return capacity - unique_max - 1, unique_max


class DeviceExpertCache:
    def __init__(
        self,
        store: HostExpertStore,
        budget_bytes: int,
        policy: EvictionPolicy,
        unique_max: int,
        device=None,
        check_budget: bool = False,
    ):
        cfg = store.config
        self.store, self.budget_bytes, self.check_budget = store, budget_bytes, check_budget
        self.unique_max = unique_max
        self.device = jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind="device")
        total = len(store.keys())
        slots, self.staging = plan_geometry(budget_bytes, store.expert_bytes, total, unique_max)
        self.schedule = Schedule(slots, self.staging, policy)
        d, i, dt = cfg.hidden_size, cfg.expert_intermediate_size, cfg.dtype
        with jax.default_device(self.device.device_set.pop()):
            self.filler = (jnp.zeros((d, 2 * i), dt), jnp.zeros((i, d), dt)) if self.staging else None
            if self.staging:
                self.pool = (jnp.zeros((slots, d, 2 * i), dt), jnp.zeros((slots, i, d), dt))
            else:  # everything fits: stack on the host and copy once, so the device never holds two copies
                placed = self.schedule.preload(sorted(store.keys()))
                experts = [store.get(*key) for key, _ in placed]
                stacks = [np.stack([np.asarray(w[part]) for w in experts]) for part in (0, 1)]
                self.pool = tuple(jax.device_put(stacks, self.device))
        self.counters = CacheCounters()
        self._account(0)

    @property
    def num_slots(self) -> int:
        return self.schedule.num_slots

    def _account(self, in_flight: int) -> None:
        used = tree_bytes((self.pool, self.filler)) + in_flight * self.store.expert_bytes
        self.counters.peak_bytes = max(self.counters.peak_bytes, used)
        if self.check_budget and used > self.budget_bytes:
            raise AssertionError(f"expert cache holds {used} bytes, over its budget of {self.budget_bytes}")

    def issue(self, plan: PassPlan) -> tuple[tuple, np.ndarray, list]:
        """Start the plan's host->device copies (one batched `device_put`); returns the
        staged arrays padded to length M, their target slots (S for padding: dropped by
        the scatter) and the list of real copies (for waiting on)."""
        self.counters.expert_hits += len(plan.hits)
        self.counters.expert_misses += len(plan.loads)
        copies = []
        if plan.loads:
            host = [self.store.get(plan.layer, e) for e, _ in plan.loads]
            copies = jax.device_put(host, self.device)  # async: returns before the bytes land
            self.counters.h2d_bytes += len(plan.loads) * self.store.expert_bytes
        self._account(len(copies))
        pad = self.staging - len(copies)
        staged = tuple(tuple(c) for c in copies) + (self.filler,) * pad
        slots = np.array([s for _, s in plan.loads] + [self.num_slots] * pad, np.int32)
        return staged, slots, copies

    def wait(self, copies: list) -> None:
        """Block until demand copies land, and count it as stall time."""
        if copies:
            start = time.perf_counter()
            jax.block_until_ready(copies)
            self.counters.stall_s += time.perf_counter() - start
