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
    lowest predicted probability x use count (FineMoE's rule); ties go LRU. An expert
    without a current prediction scores 0. (Scoring a never-predicted layer's experts
    by their share of that layer's visits instead cut demand misses but moved more
    bytes in total on the shipped model: see docs/PREDICTOR.md.) The schedule
    protects the experts predicted for the next layer."""

    name = "predictor"

    def __init__(self):
        self.uses: collections.Counter[Key] = collections.Counter()
        self.last_use: dict[Key, int] = {}
        self.predicted: dict[Key, float] = {}

    def on_use(self, key: Key, tick: int) -> None:
        self.uses[key] += 1
        self.last_use[key] = tick

    def observe(self, layer: int, probabilities: dict[int, float]) -> None:
        """The latest prediction for `layer` replaces the previous one."""
        self.predicted = {k: p for k, p in self.predicted.items() if k[0] != layer}
        self.predicted.update(((layer, e), p) for e, p in probabilities.items())

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(
            candidates,
            key=lambda k: (self.predicted.get(k, 0.0) * (self.uses[k] + 1), self.last_use.get(k, -1), k),
        )


POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, PredictorAware)}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
