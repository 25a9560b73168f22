"""The transfer schedule: which experts to copy, where to put them, what to evict.

Plain Python over small tables; nothing here touches an array, so every decision
can be built and tested without a device. The device cache executes a PassPlan
by issuing the copies it lists; the engine records the plans it executed.

A layer's experts are computed in one pass when they fit; a prefill that routes
to more experts than the cache holds takes several passes, each with at most
`num_slots` experts resident and at most `staging` of them newly copied.
A prefetch plan gives slots to experts predicted for the next layer before that
layer's routing is known; they count as hits there, and only cost bandwidth when
the prediction is wrong.
A retain plan (streamed prefill) keeps a layer's most-used experts of the prompt
in the cache for decode; they are copied on the device from the streamed layer.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

from jaxmoe.offload.policy import EvictionPolicy, Key


@dataclasses.dataclass(frozen=True)
class PassPlan:
    step: int  # token step: 0 is the prefill, n the n-th decode step
    layer: int
    index: int  # pass number within this layer and step
    experts: tuple[int, ...]  # computed in this pass, ascending
    slots: tuple[int, ...]  # cache slot of each expert, aligned with `experts`
    hits: tuple[int, ...]  # already on the device
    loads: tuple[tuple[int, int], ...]  # (expert, slot): host -> device copies to issue before dispatch
    evicted: tuple[Key, ...]  # (layer, expert) whose slots were given up
    kind: str = "demand"  # "prefetch": copies issued ahead, for `layer`, before its routing is known;
    # "retain": a streamed prefill layer's experts kept for decode (device copies, no transfer)
    prefetched_hits: tuple[int, ...] = ()  # hits that an earlier prefetch brought in
    resume: bool = False  # decode: the step's program ran again from this layer after its loads

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "step": self.step,
            "layer": self.layer,
            "pass": self.index,
            "experts": list(self.experts),
            "hits": list(self.hits),
            "prefetched_hits": list(self.prefetched_hits),
            "loads": [list(x) for x in self.loads],
            "evicted": [list(x) for x in self.evicted],
            "resume": self.resume,
        }


class Schedule:
    """Slot table plus policy; `plan_layer` is the only way slots change."""

    def __init__(self, num_slots: int, staging: int, policy: EvictionPolicy, prefetch_staging: int = 0):
        if num_slots < 1 or staging < 0:
            raise ValueError(f"need at least one slot (got {num_slots}) and staging >= 0 (got {staging})")
        self.num_slots, self.staging, self.policy = num_slots, staging, policy
        self.prefetch_staging = prefetch_staging
        self.prefetched: set[Key] = set()  # brought in by a prefetch and not used yet
        self.slot_of: dict[Key, int] = {}
        self._free = list(range(num_slots))  # a heap: lowest free slot first, so plans are deterministic
        self._tick = 0
        self.executed: list[PassPlan] = []

    def preload(self, keys: Sequence[Key]) -> list[tuple[Key, int]]:
        """Place `keys` in free slots (everything-resident budgets); returns (key, slot)."""
        if len(keys) > len(self._free):
            raise ValueError(f"{len(keys)} experts do not fit {len(self._free)} free slots")
        placed = [(key, heapq.heappop(self._free)) for key in keys]
        self.slot_of.update(placed)
        return placed

    def reassign(self, slot_of: dict[Key, int]) -> None:
        """Take the slots a decode on the device left ({key: slot}); nothing is prefetched-unused."""
        self.slot_of = dict(slot_of)
        used = set(self.slot_of.values())
        self._free = [s for s in range(self.num_slots) if s not in used]  # ascending: a heap
        self.prefetched = set()

    def _evict(self, key: Key) -> int:
        self.prefetched.discard(key)
        slot = self.slot_of.pop(key)
        heapq.heappush(self._free, slot)
        return slot

    def plan_layer(self, step: int, layer: int, needed: Sequence[int], protect: Sequence[Key] = (),
                   resume: bool = False) -> list[PassPlan]:  # fmt: skip
        """The demand passes of `layer`; `protect`: keys not to evict (the next layer's
        predicted experts, about to be prefetched); `resume`: the step resumes at this
        layer once its loads land (one-program decode)."""
        needed = sorted(set(int(e) for e in needed))
        protect = set(protect)
        self.policy.visit(layer, needed)
        evicted: list[Key] = []
        # With no staging room every expert is preloaded and nothing may be evicted.
        if self.policy.keep_only_current and self.staging:
            for key in [k for k in self.slot_of if k[0] != layer or k[1] not in needed]:
                self._evict(key)
                evicted.append(key)
        hits = [e for e in needed if (layer, e) in self.slot_of]
        misses = [e for e in needed if (layer, e) not in self.slot_of]
        if misses and self.staging == 0:
            raise RuntimeError("a load is needed but the cache has no staging room")
        passes = []
        while hits or misses or not passes:
            room = self.num_slots - len(hits)
            take = misses[: min(self.staging, room)]
            misses = misses[len(take) :]
            passes.append(self._plan_pass(step, layer, len(passes), hits, take, evicted, protect, resume))
            hits, evicted = [], []
        self.executed.extend(passes)
        return passes

    def _plan_pass(self, step, layer, index, hits, misses, evicted, protect=frozenset(), resume=False) -> PassPlan:
        self._tick += 1
        pinned = {(layer, e) for e in hits + misses}
        # Protection yields when nothing else could go (a tiny cache): the demand pass must fit.
        if protect:
            blocked = pinned | protect
            if len(self._free) + sum(k not in blocked for k in self.slot_of) >= len(misses):
                pinned = blocked
        loads = []
        for e in misses:
            if not self._free:
                victim = self.policy.victim(k for k in self.slot_of if k not in pinned)
                self._evict(victim)
                evicted.append(victim)
            slot = heapq.heappop(self._free)
            self.slot_of[(layer, e)] = slot
            loads.append((e, slot))
        experts = tuple(sorted(hits + misses))
        for e in experts:
            self.policy.on_use((layer, e), self._tick)
        used_prefetch = tuple(e for e in hits if (layer, e) in self.prefetched)
        self.prefetched.difference_update((layer, e) for e in used_prefetch)
        return PassPlan(
            step=step,
            layer=layer,
            index=index,
            experts=experts,
            slots=tuple(self.slot_of[(layer, e)] for e in experts),
            hits=tuple(hits),
            loads=tuple(loads),
            evicted=tuple(evicted),
            prefetched_hits=used_prefetch,
            resume=resume,
        )

    def _claim(self, layer: int, experts: Sequence[int], protected: set, accept=None) -> tuple[list, list]:
        """Slots for `experts` of `layer` (not resident), in order, evicting the policy's victims
        from outside `protected`; stops when nothing is left to evict. `accept(key, victim)`:
        whether `key` is worth evicting `victim` for (skipped if not). (loads, evicted)."""
        loads, evicted = [], []
        for e in experts:
            if not self._free:
                candidates = [k for k in self.slot_of if k not in protected]
                if not candidates:
                    break
                victim = self.policy.victim(candidates)
                if accept is not None and not accept((layer, e), victim):
                    continue
                self._evict(victim)
                evicted.append(victim)
            slot = heapq.heappop(self._free)
            self.slot_of[(layer, e)] = slot
            loads.append((e, slot))
        return loads, evicted

    def retain_quotas(self, layers: Sequence[int]) -> dict[int, int]:
        """Slots each MoE layer may keep after a streamed prefill: an even share, the
        remainder to the last layers (the first decode step reaches them last, so their
        experts have the longest wait before a reload would be needed), none for
        a policy that keeps only the current layer."""
        if self.policy.keep_only_current or not self.staging or not layers:
            return {layer: 0 for layer in layers}
        base, extra = divmod(self.num_slots, len(layers))
        return {layer: base + (i >= len(layers) - extra) for i, layer in enumerate(layers)}

    def plan_retain(self, step: int, layer: int, ranked: Sequence[int], quota: int, protected: set) -> PassPlan:
        """Slots for the first `quota` of `ranked` (most used first) not resident; victims come
        from outside `protected` (what earlier layers of this prefill kept, what later ones
        will still read)."""
        self._tick += 1
        keep = [int(e) for e in ranked[:quota]]
        protected = protected | {(layer, e) for e in keep}
        loads, evicted = self._claim(layer, [e for e in keep if (layer, e) not in self.slot_of], protected)
        kept = tuple(e for e in keep if (layer, e) in self.slot_of)
        for e in kept:
            self.policy.on_use((layer, e), self._tick)
        plan = PassPlan(
            step=step,
            layer=layer,
            index=0,
            experts=kept,
            slots=tuple(self.slot_of[(layer, e)] for e in kept),
            hits=(),  # keeping an expert is not a use of it
            loads=tuple(loads),
            evicted=tuple(evicted),
            kind="retain",
        )
        self.executed.append(plan)
        return plan

    def plan_prefetch(self, step: int, layer: int, predicted: Sequence[int], protect: Sequence[Key] = (),
                      limit: int | None = None, accept=None) -> PassPlan:  # fmt: skip
        """Slots for the predicted experts of `layer` that are not resident, best first, at most
        `prefetch_staging` (and `limit`); never evicts another predicted expert of that layer,
        nor `protect` (the experts the step is about to compute, other prefetches); `accept`:
        see `_claim`."""
        protected = {(layer, int(e)) for e in predicted} | set(protect)
        cap = self.prefetch_staging if limit is None else min(limit, self.prefetch_staging)
        wanted = [int(e) for e in predicted if (layer, int(e)) not in self.slot_of][:cap]
        loads, evicted = self._claim(layer, wanted, protected, accept)
        self.prefetched.update((layer, e) for e, _ in loads)
        plan = PassPlan(
            step=step,
            layer=layer,
            index=0,
            experts=tuple(e for e, _ in loads),
            slots=tuple(s for _, s in loads),
            hits=(),
            loads=tuple(loads),
            evicted=tuple(evicted),
            kind="prefetch",
        )
        self.executed.append(plan)
        return plan
