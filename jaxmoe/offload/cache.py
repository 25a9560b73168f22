"""The device expert cache: the only place that moves expert bytes to the device.

Memory, all counted against the byte budget:
  pool     [S, bytes] uint8: S cached experts, each one row holding its format's buffer
           (jaxmoe/quant/format.py), preallocated; a program unpacks (and dequantizes)
           only the rows it gathers (`pool_experts`). Bytes, not bf16, because XLA CPU
           writes a bf16 array in place through fp32 (docs/DECODE.md)
  workspace  none for a one-row decode step: each of its k experts is read where it lies in
           the pool (model/experts.py, `expert_pairs`). A larger batch
           computes its U distinct experts as one batched contraction, gathered out of the
           pool first (U experts, or for a quantized format U stored rows plus their unpacked
           weights); `workspace_experts`
Copies take no room of their own: each lands in its pool slot in place (the deviceless
H100 compile of the fetch and decode programs allocates no landing buffer: docs/DECODE.md).
A budget of every expert (plus any gather) preloads them all: no copies.

Copies go straight into their pool slots: a fetch program (`fetch_into_pool`, a fixed U + P
lanes, so one compiled program serves every pass) copies each planned expert's row from
its pinned host layer into its slot, in place. A routed prefill pass (`issue`) and a
host-planned decode's missed layer (`load`) both use it; the decode on the device fetches
its misses in its own step program (device_cache.py). A host-planned decode step finds its
experts through a table ([L, E] pool rows, -1 when absent) on the device; the device decode
compares against the slot owners (device_cache.py). A streamed prefill moves whole
layers outside this budget (at most two at once, see prefill_plan.py): `stream` sends
a layer's experts and takes device copies of those already cached, `stack` puts them
into one stack as the resident engine holds a layer, `retain` keeps the prompt's
most-used ones in the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.runtime.metrics import fmt_bytes, tree_bytes
from jaxmoe.runtime.phases import PhaseClock
from jaxmoe.runtime.programs import Programs
from jaxmoe.model import PackedExperts, num_unique_experts
from jaxmoe.model.experts import PAIR_TOKENS
from jaxmoe.offload import device_cache as dc
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.policy import EvictionPolicy
from jaxmoe.offload.schedule import PassPlan, Schedule
from jaxmoe.config import MoEConfig
from jaxmoe.quant import DENSE, ExpertFormat, packed_experts


def pool_experts(pool: jax.Array, fmt: ExpertFormat, cfg) -> PackedExperts:
    """Inside a program: the pool's rows as experts to compute with; only the rows the
    program gathers are unpacked (unpacking the whole pool outside a layer's conditional
    would be a copy of it)."""
    return packed_experts(pool, fmt, cfg)


def take_from_pool(pool, slot):  # the function's name is the program's name in a profile
    return pool[slot]


def stack_experts(buffers, fmt: ExpertFormat, cfg: MoEConfig):  # the program's name in a profile
    """A layer's expert buffers (every id, in order) held as the resident engine holds a
    layer: dense weights [E, ...] (unpacked once here, not in each program that computes
    with them), or the format's rows [E, bytes]."""
    rows = jnp.stack(buffers)
    return fmt.unpack(cfg, rows) if fmt.kind == "dense" else packed_experts(rows, fmt, cfg)


def dense_parts(w) -> dict:
    """ExpertWeights stacks as the dense format's parts (biases too, when the experts have them)."""
    parts = {("w_gate_up", "w"): w.w_gate_up, ("w_down", "w"): w.w_down}
    if w.b_gate_up is not None:
        parts |= {("w_gate_up", "bias"): w.b_gate_up, ("w_down", "bias"): w.b_down}
    return parts


@jax.named_scope("pool_write")
def write_rows(pool: jax.Array, layer, index: jax.Array, slots: jax.Array, fmt: ExpertFormat, cfg: MoEConfig):
    """Inside a jitted program: experts `index` [W] of a stacked layer (stack_experts) into
    pool slots [W] as rows (in place when the pool is donated); a slot past the end
    (padding) is dropped."""
    if isinstance(layer, PackedExperts):
        rows = layer.parts[0][index]
    else:
        rows = fmt.pack_stacks(cfg, dense_parts(layer.rows(index)))
    return pool.at[slots].set(rows, mode="drop")


def fetch_in_jit(host_layer: jax.Array, index: jax.Array) -> tuple:
    """Inside a jitted program: rows `index` [W] of a pinned host layer [E, bytes], each copied
    into its own device buffer (only those rows move). With the latency hiding scheduler
    (GPU) the copies can run while the rest of the program computes."""
    return tuple(jax.device_put(jax.lax.dynamic_index_in_dim(host_layer, index[i], keepdims=False),
                                jax.memory.Space.Device) for i in range(index.shape[0]))  # fmt: skip


def fetch_rows(host_layer, index):  # the function's name is the program's name in a profile
    return fetch_in_jit(host_layer, index)


def fetch_into_pool(pool, host_layer, index, slots):  # the program's name in a profile
    """Rows `index` [W] of a pinned host layer into pool `slots` [W] in place; a slot past the
    end (padding) copies nothing."""
    return dc.fetch_into(pool, host_layer, index, slots, slots < pool.shape[0])


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
    peak_bytes: int = 0  # pool + workspace (workspace_experts), by the cache's own accounting

    @property
    def hit_rate(self) -> float | None:
        total = self.expert_hits + self.expert_misses
        return self.expert_hits / total if total else None


def workspace_experts(batch: int, fmt: ExpertFormat, cfg: MoEConfig) -> int:
    """Device memory a decode step of `batch` rows needs beside the pool, in stored experts. A
    one-row step (PAIR_TOKENS) none: each of its experts is read in place (`expert_pairs`; the
    deviceless H100 compile of the step allocates no copy of an expert). Beyond, the step
    gathers its U distinct experts' rows and, for a quantized format, their unpacked weights
    in the compute dtype (as many bytes as U dense experts). The one figure the budget check,
    the geometry and the cache's accounting all use."""
    if batch <= PAIR_TOKENS:
        return 0
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    if fmt.kind == "dense":
        return unique
    return unique + -(-unique * DENSE.nbytes(cfg) // fmt.nbytes(cfg))


def minimum_experts(unique_max: int, workspace: int) -> int:
    """The smallest budget, in experts: the `unique_max` experts one layer can need resident,
    plus the workspace (`workspace_experts`)."""
    return unique_max + workspace


def batch_minimum_experts(batch: int, fmt: ExpertFormat, cfg: MoEConfig) -> int:
    """The smallest budget, in experts, of a decode step of `batch` rows (`minimum_experts`)."""
    return minimum_experts(num_unique_experts(cfg.num_experts, batch, cfg.top_k), workspace_experts(batch, fmt, cfg))


def plan_geometry(budget_bytes: int, expert_bytes: int, total_experts: int, unique_max: int,
                  workspace: int = 0) -> int:  # fmt: skip
    """Pool slots S for a budget (S == total_experts: every expert resident, nothing copied
    while decoding), or BudgetError naming the minimum.

    A layer needs up to `unique_max` experts resident at once, so S >= unique_max; the
    workspace (`workspace_experts`) comes out of the same budget.
    Prefetches need no room of their own: they take slots no current expert holds, or wait.
    """
    capacity = budget_bytes // expert_bytes
    if capacity >= total_experts + workspace:
        return total_experts
    minimum = minimum_experts(unique_max, workspace)
    if capacity < minimum:
        gather = f" and the expert program's gather ({workspace} experts' bytes)" if workspace else ""
        raise BudgetError(
            f"expert budget {fmt_bytes(budget_bytes)} is below the minimum working set of "
            f"{fmt_bytes(minimum * expert_bytes)}: {unique_max} experts one layer can need for this batch"
            f"{gather}, at {fmt_bytes(expert_bytes)} each"
        )
    return capacity - workspace


class DeviceExpertCache:
    def __init__(
        self,
        store: HostExpertStore,
        budget_bytes: int,
        policy: EvictionPolicy,
        unique_max: int,
        workspace: int = 0,
        prefetch_max: int = 0,
        device=None,
        check_budget: bool = False,
        programs: Programs | None = None,
    ):
        """`workspace`: the decode step's, in stored experts (`workspace_experts`); `programs`:
        where the cache's own programs (take, write) are compiled; the engine passes its own,
        so that preparing a bucket compiles them too."""
        self.programs = programs if programs is not None else Programs()
        self.store, self.budget_bytes, self.check_budget = store, budget_bytes, check_budget
        self.unique_max, self.workspace = unique_max, workspace
        self.device = jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind="device")
        total = len(store.keys())
        slots = plan_geometry(budget_bytes, store.expert_bytes, total, unique_max, workspace)
        resident = slots == total
        if resident:  # nothing to prefetch
            prefetch_max = 0
        self.workspace_bytes = workspace * store.expert_bytes  # beside the pool while a layer computes
        # The lanes of a fetch: a layer's demand copies and the next one's prefetches (0: everything resident).
        self.staging = 0 if resident else unique_max + prefetch_max
        self.schedule = Schedule(slots, 0 if resident else unique_max, policy, prefetch_max)
        self._table, self._table_stale = None, True
        self._policy_arrays = None  # what the device policy learned (device_cache.policy_arrays)
        nbytes, self.format = store.expert_bytes, store.format
        with jax.default_device(self.device.device_set.pop()):
            if self.staging:
                self.pool = jnp.zeros((slots, nbytes), jnp.uint8)
            else:  # everything fits: stack on the host and copy once, so the device never holds two copies
                placed = self.schedule.preload(sorted(store.keys()))
                rows = np.empty((len(placed), nbytes), np.uint8)
                for layer in sorted({layer for (layer, _), _ in placed}):
                    layer_rows = store.rows(layer)
                    for (key_layer, e), slot in placed:
                        if key_layer == layer:
                            rows[slot] = layer_rows[e]
                self.pool = jax.device_put(rows, self.device)
        self.counters = CacheCounters()
        self.clock = PhaseClock()  # the engine shares its own
        self._account()

    def begin(self) -> None:
        """A new generate: counters from zero and an empty executed plan; the cached experts stay."""
        self.counters = CacheCounters()
        self.schedule.executed = []

    @property
    def num_slots(self) -> int:
        return self.schedule.num_slots

    def _account(self) -> None:
        used = tree_bytes(self.pool) + self.workspace_bytes
        self.counters.peak_bytes = max(self.counters.peak_bytes, used)
        if self.check_budget and used > self.budget_bytes:
            raise AssertionError(f"expert cache holds {used} bytes, over its budget of {self.budget_bytes}")

    def _copy(self, layer: int, experts: Sequence[int]) -> list:
        """Copies of `experts` of `layer` from pinned host memory, each into its own device buffer
        (one fetch program; async: returns before the bytes land); counted as moved."""
        if not experts:
            return []
        self.counters.h2d_bytes += len(experts) * self.store.expert_bytes
        host, index = self.store.layer(layer), np.asarray(experts, np.int32)
        with self.clock.phase("copy_issue"):
            copies = list(self.programs.get("fetch_rows", fetch_rows, {}, (), host, index)(host, index))
        self.clock.device("copy", copies)
        return copies

    def record(self, plan: PassPlan) -> None:
        """Count a plan's hits and loads (a prefetch plan's loads as prefetches); a plan
        that moved slots makes the device table stale."""
        if plan.kind == "prefetch":
            self.counters.prefetch_issued += len(plan.loads)
        else:
            self.counters.expert_hits += len(plan.hits)
            self.counters.expert_misses += len(plan.loads)
            self.counters.prefetch_used += len(plan.prefetched_hits)
        if plan.loads or plan.evicted:
            self._table_stale = True

    def issue(self, plan: PassPlan) -> list:
        """Copy a routed prefill pass's loads into their pool slots; returns what to wait on
        (the pool, or nothing when nothing moved)."""
        self.record(plan)
        self._fetch_into_pool([(plan.layer, e, slot) for e, slot in plan.loads])
        return [self.pool] if plan.loads else []

    def load(self, plans: Sequence[PassPlan]) -> bool:
        """Copy every plan's loads into their pool slots (a fetch program per layer, dispatched
        before the step program that reads them, so the host never waits on a copy) and the
        new table. Returns whether anything was copied."""
        for plan in plans:
            self.record(plan)
        loads = [(plan.layer, e, slot) for plan in plans for e, slot in plan.loads]
        if not loads:
            return False
        self._fetch_into_pool(loads)
        with self.clock.phase("copy_issue"):
            self._table, self._table_stale = jax.device_put(self._table_array(), self.device), False
        return True

    def _fetch_into_pool(self, loads: Sequence[tuple[int, int, int]]) -> None:
        """(layer, expert, slot) rows from pinned host memory into the pool, in place: one fetch
        program per layer, of `staging` lanes (the padding lanes copy nothing); counted as moved."""
        self.counters.h2d_bytes += len(loads) * self.store.expert_bytes
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, e, slot in loads:
            by_layer.setdefault(layer, []).append((e, slot))
        with self.clock.phase("copy_issue"):
            for layer, pairs in by_layer.items():
                for start in range(0, len(pairs), self.staging):
                    lanes = pairs[start : start + self.staging]
                    pad = self.staging - len(lanes)
                    index = np.array([e for e, _ in lanes] + [0] * pad, np.int32)
                    slots = np.array([s for _, s in lanes] + [self.num_slots] * pad, np.int32)
                    self.pool = self._fetch_program()(self.pool, self.store.layer(layer), index, slots)
        self.clock.device("copy", self.pool)
        self._account()

    def prepare_fetch(self) -> None:
        """Compile the fetch program (issue, load) ahead of a generate."""
        if self.staging:
            self._fetch_program()

    def _fetch_program(self):
        lanes = jax.ShapeDtypeStruct((self.staging,), jnp.int32)
        host = self.store.layer(self.store.config.moe_layer_ids[0])
        return self.programs.get("fetch_into_pool", fetch_into_pool, {}, (0,), self.pool, host, lanes, lanes,
                                 options=dc.FETCH_OPTIONS)  # fmt: skip

    def _table_array(self) -> np.ndarray:
        cfg = self.store.config
        table = np.full((cfg.num_layers, cfg.num_experts), -1, np.int32)
        for (layer, e), slot in self.schedule.slot_of.items():
            table[layer, e] = slot
        return table

    def table(self) -> jax.Array:
        """[L, E] int32 on the device: the pool row of each (layer, expert), -1 where absent;
        copied again only after a plan moved slots."""
        if self._table_stale:
            self._table, self._table_stale = jax.device_put(self._table_array(), self.device), False
        return self._table

    def step_inputs(self) -> tuple:
        """(pool, table) for a host-planned step program."""
        return self.pool, self.table()

    def device_state(self) -> "dc.CacheState":
        """The cache as one device pytree for a decode whose misses are fetched in the program
        (device_cache.py): the pool, the slots of what the schedule placed, and what
        the device policy learned in earlier generates."""
        cfg = self.store.config
        return dc.new_state(self.pool, self.schedule.slot_of, self.num_slots, cfg.num_layers, cfg.num_experts,
                            self._policy_arrays, self.schedule.policy.device_arrays(cfg.num_layers))  # fmt: skip

    def take_device_state(self, state: "dc.CacheState", counts: dict) -> None:
        """After such a decode: its pool, its slot owners (read back to the schedule, which the next
        prefill plans with), its counters, and its policy's arrays for the next generate."""
        self.pool = state.pool
        self.schedule.reassign(dc.slots_of(np.asarray(state.slot_key), self.store.config.num_experts))
        self._table_stale = True
        self._policy_arrays = dc.policy_arrays(state)
        if state.reuse is not None:
            self.schedule.policy.take_device_arrays(state.reuse)
        self.count_device(self.counters, counts)

    def count_device(self, c: CacheCounters, counts: dict) -> None:
        """Add a device decode's counters (device_cache.COUNTERS by name) into `c`."""
        c.expert_hits += counts["expert_hits"]
        c.expert_misses += counts["expert_misses"]
        c.prefetch_issued += counts["prefetch_issued"]
        c.prefetch_used += counts["prefetch_used"]
        c.h2d_bytes += (counts["expert_misses"] + counts["prefetch_issued"]) * self.store.expert_bytes

    def step_outputs(self, pool) -> None:
        """The pool a step program returned (donated: the same buffer's successor)."""
        self.pool = pool

    def stream(self, layer: int, sent: Sequence[int], cached: Sequence[int]) -> tuple[dict[int, jax.Array], list]:
        """A whole layer for a streamed prefill: `sent` copied from the host (one fetch
        program), `cached` copied out of the pool on the device. Returns every
        expert's buffer by id, and the host copies (to wait on)."""
        self.counters.expert_misses += len(sent)
        self.counters.expert_hits += len(cached)
        copies = self._copy(layer, sent)
        out = dict(zip(sent, copies))
        for e in cached:
            slot = jnp.int32(self.schedule.slot_of[(layer, e)])
            out[e] = self.programs.get("take_from_pool", take_from_pool, {}, (), self.pool, slot)(self.pool, slot)
        return out, copies

    def host_experts(self, layer: int, sent: Sequence[int]) -> tuple[jax.Array, np.ndarray]:
        """(the pinned host layer, the ids [W] of `sent`) for a program that copies them itself
        (fetch_in_jit), counted as moved."""
        self.counters.expert_misses += len(sent)
        self.counters.h2d_bytes += len(sent) * self.store.expert_bytes
        return self.store.layer(layer), np.asarray(sent, np.int32)

    def stack(self, layer_experts: dict[int, jax.Array]):
        """A streamed layer's experts (every id) as one stack in the resident engine's form
        (stack_experts), once they have landed; the host waits for it, so the separate copies
        are freed before the caller issues another layer's."""
        buffers = tuple(layer_experts[e] for e in range(self.store.config.num_experts))
        stack = self._stack_program()(buffers)
        jax.block_until_ready(stack)
        return stack

    def retain(self, plan: PassPlan, stack, width: int) -> None:
        """Write a retain plan's experts from a streamed layer's stack into their pool slots;
        the experts are padded to the static `width` (so one program serves every layer)."""
        if not plan.loads:
            return
        self._table_stale = True
        pad = width - len(plan.loads)
        index = jnp.asarray([e for e, _ in plan.loads] + [0] * pad, jnp.int32)
        slots = jnp.asarray([s for _, s in plan.loads] + [self.num_slots] * pad, jnp.int32)
        self.pool = self._write_program(width)(self.pool, stack, index, slots)
        jax.block_until_ready(self.pool)  # the streamed layer may be freed only after this

    def _layer_form(self) -> dict:
        return {"fmt": self.format, "cfg": self.store.config}

    def _layer_buffers(self) -> tuple:
        return (jax.ShapeDtypeStruct((self.store.expert_bytes,), jnp.uint8),) * self.store.config.num_experts

    def _stack_program(self):
        return self.programs.get("stack_experts", stack_experts, self._layer_form(), (), self._layer_buffers())

    @functools.cached_property
    def stack_spec(self):
        """A stacked layer's shapes (stack_experts' output), traced once: a trace in every retain
        costs host time at every streamed layer (docs/DECODE.md)."""
        return jax.eval_shape(lambda b: stack_experts(b, **self._layer_form()), self._layer_buffers())

    def _write_program(self, width: int):
        index = jax.ShapeDtypeStruct((width,), jnp.int32)
        return self.programs.get("write_rows", write_rows, self._layer_form(), (0,), self.pool, self.stack_spec,
                                 index, index)  # fmt: skip

    def prepare_stream(self, width: int, sent: Sequence[int] = ()) -> None:
        """Compile what a streamed prefill asks of the cache: fetching `sent` experts of a layer
        (each count in it), taking a cached expert out of the pool, stacking a layer, and
        writing `width` retained experts into the pool."""
        host = self.store.layer(self.store.config.moe_layer_ids[0])
        for count in sorted(set(sent) - {0}):
            self.programs.get("fetch_rows", fetch_rows, {}, (), host, jax.ShapeDtypeStruct((count,), jnp.int32))
        slot = jax.ShapeDtypeStruct((), jnp.int32)
        self.programs.get("take_from_pool", take_from_pool, {}, (), self.pool, slot)
        self._stack_program()
        if self.staging and width:  # a cache that holds every expert retains nothing
            self._write_program(width)

    def wait(self, copies: list) -> None:
        """Block until demand copies land, and count it as stall time."""
        if copies:
            start = time.perf_counter()
            jax.block_until_ready(copies)
            waited = time.perf_counter() - start
            self.counters.stall_s += waited
            if self.clock.enabled:
                self.clock.add("copy_wait", waited)
