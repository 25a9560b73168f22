"""Eviction policies for the device expert cache: which cached expert makes room.

A policy sees only (layer, expert) keys and a monotonically increasing tick (one
per layer pass); it never touches arrays. Experts pinned for the step in flight
are never offered as candidates.
"""

from __future__ import annotations

import collections
from typing import Iterable

Key = tuple[int, int]  # (layer, expert)


class EvictionPolicy:
    name = "base"
    # ondemand keeps nothing beyond the layer being computed.
    keep_only_current = False

    def on_use(self, key: Key, tick: int) -> None:
        """`key` was needed by the pass at `tick` (hit or load)."""

    def victim(self, candidates: Iterable[Key]) -> Key:
        raise NotImplementedError


class OnDemand(EvictionPolicy):
    """Load what the current layer needs, drop everything else: the no-cache baseline."""

    name = "ondemand"
    keep_only_current = True

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates)


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.last_use: dict[Key, int] = {}

    def on_use(self, key: Key, tick: int) -> None:
        self.last_use[key] = tick

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))


class LFU(EvictionPolicy):
    """Fewest uses since the run began (counts survive eviction, so a newly loaded
    expert is judged by its history, not by its time in the cache); ties go LRU."""

    name = "lfu"

    def __init__(self):
        self.uses: collections.Counter[Key] = collections.Counter()
        self.last_use: dict[Key, int] = {}

    def on_use(self, key: Key, tick: int) -> None:
        self.uses[key] += 1
        self.last_use[key] = tick

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.uses[k], self.last_use.get(k, -1), k))


class PredictorAware(EvictionPolicy):
    """For prediction-driven prefetch: evict the expert least likely to be needed soon,
    lowest predicted probability x use count (FineMoE's rule); ties go LRU. An expert of
    a layer no prediction covers (the first MoE layer) is scored by its share of that
    layer's visits instead of 0, so those layers are not always evicted first. The
    schedule protects the experts predicted for the next layer."""

    name = "predictor"

    def __init__(self):
        self.uses: collections.Counter[Key] = collections.Counter()
        self.last_use: dict[Key, int] = {}
        self.predicted: dict[Key, float] = {}
        self.predicted_layers: set[int] = set()
        self.visits: collections.Counter[int] = collections.Counter()  # layer -> passes that used it
        self._last_tick: dict[int, int] = {}

    def on_use(self, key: Key, tick: int) -> None:
        self.uses[key] += 1
        self.last_use[key] = tick
        if self._last_tick.get(key[0]) != tick:
            self._last_tick[key[0]] = tick
            self.visits[key[0]] += 1

    def observe(self, layer: int, probabilities: dict[int, float]) -> None:
        """The latest prediction for `layer` replaces the previous one."""
        self.predicted = {k: p for k, p in self.predicted.items() if k[0] != layer}
        self.predicted.update(((layer, e), p) for e, p in probabilities.items())
        self.predicted_layers.add(layer)

    def _chance(self, key: Key) -> float:
        if key[0] in self.predicted_layers:
            return self.predicted.get(key, 0.0)
        return self.uses[key] / max(1, self.visits[key[0]])

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self._chance(k) * (self.uses[k] + 1), self.last_use.get(k, -1), k))


POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, PredictorAware)}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
