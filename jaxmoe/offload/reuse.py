"""Eviction that approaches Belady's MIN: evict the expert whose next use is expected
farthest ahead.

MIN evicts the key whose next use lies farthest in the future; an online policy can
only estimate that. Decode visits the MoE layers in a fixed cycle, so a key (l, e) is
next looked at after d layer steps (d = 1 for the layer after the current one, Lm for the
current layer's own experts), and is then needed with probability q: the prediction
for this token where one was made (the next-layer scorer, expert maps), else p, a
decayed frequency of the expert at its layer's visits (an exponentially weighted mean,
as in LFRU: recent visits count most). If it is not needed there, each later visit needs
it with probability p, so its next use is expected after

    d + (1 - q) * Lm / p        layer steps                      (geometric)

and the policy evicts the largest. Ties go least recently used. Unlike LRU, which evicts
exactly the layer about to run in a cyclic pass, this keeps what the next layers need.

`ExpertMapsPolicy` is the same rule with expert maps (jaxmoe/offload/expert_maps.py): they
predict every later layer of the token where a layer missed, and a request's prior
comes from the maps of similar earlier requests.

Here the rule plans the prefill (and the maps policy's decode); the `reuse` decode runs it
on the device (device_cache.expected_wait, tested equal to this), starting from these
estimates (`device_arrays`) and handing them back when it ends. There a prediction is the
scorer's for the next MoE layer (the device's prefetch rule), and its copies are not gated
by the cost model.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.device_cache import ReuseState
from jaxmoe.offload.expert_maps import ExpertMaps, MapsConfig
from jaxmoe.offload.policy import EvictionPolicy, Key, PolicyShape


@dataclasses.dataclass(frozen=True)
class ReuseConfig:
    # Weights of a layer's newest visit in its decayed frequency: one estimate per weight is
    # kept, and the one that has foretold visits best lately is used (a model whose experts
    # repeat token after token wants a fast one, one with stable favourites a slow one).
    decays: tuple[float, ...] = (0.02, 0.05, 0.2, 0.5)
    score_window: int = 256  # layer visits the estimates' recent errors average over
    floor: float = 0.02  # the smallest per-visit use probability assumed (1/floor visits at most)
    request_weight: float = 0.5  # a new request's prior (request maps) against the running frequency


class ReuseAware(EvictionPolicy):
    name = "reuse"
    prefetch = "gated"
    scorer = "optional"  # without one, nothing is predicted: demand loads and this eviction only
    needs_shape = True

    def __init__(self, shape: PolicyShape, config: ReuseConfig = ReuseConfig()):
        self.shape, self.config = shape, config
        self.order = {layer: j for j, layer in enumerate(shape.moe_layers)}
        self.index = np.full(max(shape.moe_layers) + 1, -1, np.int64)  # layer id -> MoE index, vectorised
        self.index[list(shape.moe_layers)] = np.arange(len(shape.moe_layers))
        self.lm, e = len(shape.moe_layers), shape.num_experts
        # Per-visit use probability of each expert, per decay and MoE layer index: K/E at first.
        self.estimates = np.full((len(config.decays), self.lm, e), shape.top_k / e)
        self.errors = np.zeros(len(config.decays))  # recent error of each decay's estimate (see visit)
        self.upcoming = np.full((self.lm, e), np.nan)  # predictions for layers later in this token
        self.position = self.lm - 1  # index of the layer being planned; a token starts at 0
        self.last_use = np.full((self.lm, e), -1, np.int64)

    def on_use(self, key: Key, tick: int) -> None:
        self.last_use[self.order[key[0]], key[1]] = tick

    @property
    def p(self) -> np.ndarray:
        """[Lm, E]: the decayed use frequency of the decay that has predicted best lately."""
        return self.estimates[int(np.argmin(self.errors))]

    def visit(self, layer: int, needed: Sequence[int]) -> None:
        j = self.order[layer]
        self.position = j
        used = np.zeros(self.shape.num_experts)
        used[list(needed)] = 1.0
        # How well each estimate foretold this visit, as a cache would use it: the share of the
        # experts used that were outside its 2K most likely.
        top = np.argsort(-self.estimates[:, j], axis=-1, kind="stable")[:, : 2 * self.shape.top_k]
        error = 1.0 - used[top].sum(-1) / max(1.0, used.sum())
        self.errors += (error - self.errors) / self.config.score_window
        decays = np.asarray(self.config.decays)[:, None]
        self.estimates[:, j] += decays * (used - self.estimates[:, j])
        self.upcoming[j] = np.nan  # this layer's routing is known now: its predictions are spent

    def next_token(self) -> None:
        self.position = -1  # every layer is ahead; distances are unchanged ((j + 1) steps)

    def observe(self, layer: int, probabilities) -> None:
        """`probabilities`: expert -> chance, or an [E] array of them."""
        j = self.order[layer]
        if isinstance(probabilities, np.ndarray):
            self.upcoming[j] = probabilities
            return
        self.upcoming[j] = np.nan
        for e, q in probabilities.items():
            self.upcoming[j, int(e)] = q

    def set_prior(self, prior: np.ndarray) -> None:
        """A request's expected per-layer use frequency [Lm, E] (from similar requests)."""
        w = self.config.request_weight
        self.estimates = (1 - w) * self.estimates + w * np.asarray(prior, np.float64)[None]

    def _estimates(self, j: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For keys at layer indices j and experts e: (chance of use at the next visit q,
        expected layer steps to the next use)."""
        freq = self.p[j, e]
        p = np.maximum(freq, self.config.floor)
        up = self.upcoming[j, e]
        later = (j > self.position) & ~np.isnan(up)  # a prediction for this token's own later layer
        q = np.where(later, up, freq)
        distance = (j - self.position) % self.lm
        distance = np.where(distance == 0, self.lm, distance)
        return q, distance + (1.0 - q) * self.lm / p

    def device_arrays(self, num_layers: int) -> ReuseState:
        """The estimates by layer id ([D, L, E], the device's indexing) and their errors."""
        estimates = np.zeros((len(self.config.decays), num_layers, self.shape.num_experts), np.float32)
        estimates[:, list(self.shape.moe_layers)] = self.estimates
        return ReuseState(jnp.asarray(estimates), jnp.asarray(self.errors, jnp.float32))

    def take_device_arrays(self, arrays: ReuseState) -> None:
        self.estimates = np.asarray(arrays.estimates, np.float64)[:, list(self.shape.moe_layers)]
        self.errors = np.asarray(arrays.errors, np.float64)

    def need_probability(self, key: Key) -> float:
        q, _ = self._estimates(np.array([self.order[key[0]]]), np.array([key[1]]))
        return float(q[0])

    def expected_next_use(self, key: Key) -> float:
        """Layer steps until `key` is expected to be needed (the quantity MIN maximises)."""
        _, steps = self._estimates(np.array([self.order[key[0]]]), np.array([key[1]]))
        return float(steps[0])

    def victim(self, candidates: Iterable[Key]) -> Key:
        keys = np.fromiter(itertools.chain.from_iterable(candidates), np.int64).reshape(-1, 2)
        j = self.index[keys[:, 0]]
        _, steps = self._estimates(j, keys[:, 1])
        # The largest expected wait; ties: least recently used, then the largest key.
        best = np.lexsort((keys[:, 1], keys[:, 0], -self.last_use[j, keys[:, 1]], steps))[-1]
        return int(keys[best, 0]), int(keys[best, 1])


class ExpertMapsPolicy(ReuseAware):
    """The reuse rule fed by expert maps; a next-layer scorer, if given, refines the
    layer after a miss; at the token boundary the next token's map picks what to copy."""

    name = "maps"
    scorer = "optional"
    maps = True
    boundary = True

    def __init__(self, shape: PolicyShape, config: ReuseConfig = ReuseConfig(), maps: ExpertMaps | None = None,
                 maps_config: MapsConfig = MapsConfig(), boundary: bool = True):  # fmt: skip
        """`boundary` False: no copies at token boundaries (the ablation eval_predictor reports)."""
        super().__init__(shape, config)
        self.boundary = boundary
        lm, e, k = len(shape.moe_layers), shape.num_experts, shape.top_k
        self.expert_maps = maps if maps is not None else ExpertMaps(lm, e, k, maps_config)
        if (self.expert_maps.lm, self.expert_maps.e, self.expert_maps.k) != (lm, e, k):
            raise ValueError(f"expert maps are for {self.expert_maps.lm} MoE layers x {self.expert_maps.e} experts, "
                             f"top-{self.expert_maps.k}; the model has {lm} x {e}, top-{k}")  # fmt: skip
