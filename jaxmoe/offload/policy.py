"""Eviction policies for the device expert cache: which cached expert makes room.

These run on the host: they plan the prefill, the host-planned decode (maps) and the host's
cache simulator; the decode of the other policies runs their device form
(device_cache.DevicePolicy), which starts from what the host policy learned (reuse's
estimates: `device_arrays`) and hands it back at the end.

A policy sees only (layer, expert) keys, a monotonically increasing tick (one
per layer pass), each layer visit's experts and the predictions the decode driver
shows it; it never touches arrays. Experts pinned for the step in flight are never
offered as candidates. What a policy asks of the driver (jaxmoe/offload/driver.py) is
declared on its class: `prefetch` (none; "next": the next layer's top predictions where
a layer missed; "gated": whatever the cost model says pays, jaxmoe/offload/costs.py),
`scorer` (whether the step program must run a next-layer scorer) and `maps` (expert
maps, jaxmoe/offload/expert_maps.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Sequence

Key = tuple[int, int]  # (layer, expert)


@dataclasses.dataclass(frozen=True)
class PolicyShape:
    """What a policy that reasons about layer order needs of the model."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int


def next_moe_layers(moe_layers: Sequence[int]) -> dict[int, int | None]:
    """For each MoE layer (ascending), the next MoE layer (None for the last)."""
    return dict(zip(moe_layers, [*moe_layers[1:], None]))


class EvictionPolicy:
    name = "base"
    # ondemand keeps nothing beyond the layer being computed.
    keep_only_current = False
    prefetch = "none"  # "none" | "next" | "gated"
    scorer = "none"  # "none" | "required" | "optional": a next-layer scorer in the step program
    maps = False  # uses expert maps
    boundary = False  # prefetches at the token boundary from the next token's map (driver.end_token)
    needs_shape = False  # its constructor takes the model's PolicyShape (make_policy)

    @classmethod
    def prefetches(cls, scored: bool) -> bool:
        """Whether it copies experts ahead of need (and a budget holds room for those copies
        in flight): only where something predicts, a scorer (`scored`) or its expert maps."""
        return cls.prefetch != "none" and (scored or cls.maps)

    def on_use(self, key: Key, tick: int) -> None:
        """`key` was needed by the pass at `tick` (hit or load)."""

    def visit(self, layer: int, needed: Sequence[int]) -> None:
        """`layer` is being planned and needs `needed` (called before its victims are chosen)."""

    def next_token(self) -> None:
        """The token boundary: what is observed next is for the coming token's layers."""

    def observe(self, layer: int, probabilities: dict[int, float]) -> None:
        """A prediction for `layer`, visited later in this token: expert -> probability."""

    def need_probability(self, key: Key) -> float:
        """The chance `key` is needed at its layer's next visit, as far as the policy knows."""
        return 0.0

    def device_arrays(self, num_layers: int):
        """What a decode on the device starts from, beyond recency and counts (device_cache.py's
        CacheState.reuse): None but for reuse."""
        return None

    def take_device_arrays(self, arrays) -> None:
        """What that decode learned (device_arrays' form), for the next prefill's plans."""

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
    without a current prediction scores 0 (its layer's visit share moves more bytes in
    total: docs/PREDICTOR.md). The schedule protects the experts predicted for the next layer."""

    name = "predictor"
    prefetch = "next"
    scorer = "required"

    def __init__(self, shape: PolicyShape | None = None):
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

    def need_probability(self, key: Key) -> float:
        return self.predicted.get(key, 0.0)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(
            candidates,
            key=lambda k: (self.predicted.get(k, 0.0) * (self.uses[k] + 1), self.last_use.get(k, -1), k),
        )


class LFRU(EvictionPolicy):
    """Least frequently-and-recently used: each use adds 1 to a count that halves every
    `half_life` tokens, so old popularity fades (LFRU); evict the lowest, ties least recent.
    Uses no prediction."""

    name = "lfru"
    needs_shape = True

    def __init__(self, shape: PolicyShape | None = None, half_life_tokens: float = 8.0):
        layers = len(shape.moe_layers) if shape else 1
        # One tick per layer pass: a token is `layers` ticks.
        self.rate = 0.5 ** (1.0 / (half_life_tokens * layers))
        self.count: dict[Key, tuple[float, int]] = {}  # key -> (count at tick, tick)
        self.last_use: dict[Key, int] = {}
        self.tick = 0

    def _value(self, key: Key) -> float:
        count, tick = self.count.get(key, (0.0, self.tick))
        return count * self.rate ** (self.tick - tick)

    def on_use(self, key: Key, tick: int) -> None:
        self.tick = tick
        self.count[key] = (self._value(key) + 1.0, tick)
        self.last_use[key] = tick

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self._value(k), self.last_use.get(k, -1), k))
