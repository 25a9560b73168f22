"""The expert cache as device state, and what the decode step does with it: each MoE layer
brings the experts it lacks from pinned host memory into the pool inside the program.

A decode step never returns to the host for a miss. After a layer routes, `ensure`
finds which of its experts are absent from the pool, picks the slots they replace by
the eviction policy (whose state is device arrays here), copies each missing expert's
row from its pinned host layer into its slot (`jax.device_put` of a dynamic slice, under
a `lax.cond` per lane so a hit moves nothing), records the slots' new owners, and returns the pool
rows the layer computes with. With a next-layer scorer, `predict` scores the next MoE
layer's experts from this layer's router input, and `prefetch` copies the likeliest
absent ones after this layer's experts computed.

The same functions run with `host=None` (no bytes move; the pool is absent): that is the
cache simulator (jaxmoe/offload/device_sim.py), so simulated counts are the engine's.

On a GPU, XLA turns an in-program host fetch into an async copy that a command buffer
cannot hold, which pushes each conditional out of the CUDA graph and makes the host read
its predicate (a blocking round trip per lane); the step is compiled with that pass
(`host-memory-transfer-asyncifier`) off, so each fetch is a kernel that reads pinned host
memory in place and every conditional stays on the device (FETCH_OPTIONS; the evidence,
from the deviceless compile of scripts/gpu_compile.py, is in docs/DECODE.md).

Shapes: N rows (batch), K experts per token, L layers, E experts, S pool slots,
U distinct experts one layer computes (static), P prefetch lanes (static), B bytes per expert.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Counters kept on the device, in this order.
COUNTERS = ("expert_hits", "expert_misses", "prefetch_issued", "prefetch_used", "predictor_calls",
            "predictor_skipped_tokens", "skipped_experts")  # fmt: skip
FETCH_OPTIONS = {"xla_disable_hlo_passes": "host-memory-transfer-asyncifier"}
DEVICE_POLICIES = ("ondemand", "lru", "lfu", "lfru", "reuse", "predictor")


@dataclasses.dataclass(frozen=True)
class DevicePolicy:
    """How the device picks victims (lowest first), and what it prefetches.

    ondemand  keeps only the current layer's experts (every other layer's are dropped as a
              layer starts): the no-cache baseline
    lru       least recently used
    lfu       fewest uses so far (counts outlive eviction), ties least recent
    lfru      uses decayed by `decay` per layer visit, ties least recent
    reuse     the largest expected wait until the next use first (offload/reuse.py's rule: each
              layer's decayed use frequency per decay in `decays`, the one that foretold
              recent visits best; the next layer's latest prediction where there is one),
              ties least recent; prefetches as `predictor` does where a scorer predicts
    predictor lowest predicted probability x (uses + 1) (FineMoE's rule), ties least recent;
              prefetches up to `prefetch` of the next MoE layer's predicted experts
    Every rule breaks its last ties by slot.

    `skip_below` W > 0 makes the decode approximate (opt-in, never the default): a routed
    (row, k) whose expert is absent from the pool and whose routing weight is below W is
    not fetched and not computed, unless another valid row needs that expert at a weight
    of at least W or as its first choice (a row's first choice is never skipped)."""

    name: str
    decay: float = 1.0  # lfru: a use's weight after one layer visit
    prefetch: int = 0  # predictor: next-layer experts copied per layer, at most
    picks: int = 0  # predictor: the scorer's picks per row
    every: int = 1  # amortised prediction: predict on every k-th decode token
    below: float | None = None  # ... and only while the recent hit rate is below this
    window: int = 32  # layer visits the recent hit rate averages over
    skip_below: float = 0.0  # approximate decode: skip missed experts whose routing weight is below this
    # reuse (offload/reuse.py's ReuseConfig and the model's MoE layers)
    decays: tuple[float, ...] = ()
    score_window: int = 256
    floor: float = 0.02
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.name not in DEVICE_POLICIES:
            raise ValueError(f"no device policy {self.name!r}; choose one of {', '.join(DEVICE_POLICIES)}")
        if self.name == "reuse" and not (self.decays and self.moe_layers):
            raise ValueError("the reuse device policy needs its decays and the model's MoE layers")
        skip_weight(self.skip_below)

    @classmethod
    def of(cls, host_policy, moe_layers, **kw) -> "DevicePolicy":
        """The device form of a host policy (offload/policy.py: its name, lfru's rate, reuse's
        config); `kw`: prefetch, picks, amortisation, skip_below."""
        config = getattr(host_policy, "config", None)
        reuse = {"decays": tuple(config.decays), "score_window": config.score_window, "floor": config.floor,
                 "moe_layers": tuple(moe_layers)} if host_policy.name == "reuse" else {}  # fmt: skip
        return cls(host_policy.name, decay=getattr(host_policy, "rate", 1.0), **reuse, **kw)


def skip_weight(weight: float) -> float:
    """The approximate decode's routing-weight threshold (0: exact), as a float; ValueError
    unless it is a finite weight >= 0 (nan fails too)."""
    weight = float(weight)
    if not 0.0 <= weight < float("inf"):
        raise ValueError(f"skip_below must be a finite weight >= 0, got {weight}")
    return weight


class ReuseState(NamedTuple):
    """The reuse rule's estimates (offload/reuse.py's ReuseAware keeps the same on the host)."""

    estimates: jax.Array  # [D, L, E] fp32: per decay, each layer's decayed per-visit use frequency
    errors: jax.Array  # [D] fp32: each decay's recent error at foretelling a visit


class CacheState(NamedTuple):
    pool: jax.Array | None  # [S, B] uint8 (None in the simulator)
    slot_key: jax.Array  # [S] int32: layer * E + expert held by the slot, -1 when empty (the only
    # record of what is where: a lookup compares against it, so no [L, E] table is scattered into)
    last_use: jax.Array  # [L, E] int32: tick of the last use, -1 never
    uses: jax.Array  # [L, E] fp32: uses (lfru: decayed to `last_use`)
    predicted: jax.Array  # [L, E] fp32: the latest prediction for each layer's experts
    prefetched: jax.Array  # [S] bool: the slot's expert came by a prefetch and is not used yet
    tick: jax.Array  # [] int32: layer visits so far
    hit_rate: jax.Array  # [] fp32: recent hit rate (amortised prediction)
    counts: jax.Array  # [len(COUNTERS)] int32
    reuse: ReuseState | None = None  # the reuse policy's estimates; None for the others


def new_state(pool, slot_of: dict, num_slots: int, num_layers: int, num_experts: int, policy_arrays=None,
              reuse: ReuseState | None = None) -> CacheState:  # fmt: skip
    """A state whose pool holds `slot_of` ({(layer, expert): slot}); the policy's arrays
    (last_use, uses, predicted) carry over from `policy_arrays` (an earlier state) if given;
    `reuse`: the reuse policy's estimates (the host policy's, offload/reuse.py)."""
    slot_key = np.full((num_slots,), -1, np.int32)
    for (layer, e), slot in slot_of.items():
        slot_key[slot] = layer * num_experts + e
    if policy_arrays is None:
        shape = (num_layers, num_experts)
        policy_arrays = (np.full(shape, -1, np.int32), np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                         np.int32(0), np.float32(1.0))  # fmt: skip
    last_use, uses, predicted, tick, hit_rate = policy_arrays
    return CacheState(pool, jnp.asarray(slot_key), jnp.asarray(last_use), jnp.asarray(uses), jnp.asarray(predicted),
                      jnp.zeros((num_slots,), bool), jnp.asarray(tick), jnp.asarray(hit_rate),
                      jnp.zeros((len(COUNTERS),), jnp.int32), reuse)  # fmt: skip


def policy_arrays(state: CacheState) -> tuple:
    """What a policy has learned, to carry into the next state (new_state)."""
    return state.last_use, state.uses, state.predicted, state.tick, state.hit_rate


def slots_of(slot_key: np.ndarray, num_experts: int) -> dict:
    """{(layer, expert): slot} from slot owners [S] read back to the host."""
    return {(int(k) // num_experts, int(k) % num_experts): s for s, k in enumerate(slot_key) if k >= 0}


def lookup(state: CacheState, layer: int, experts: jax.Array) -> jax.Array:
    """The pool slot of each of `layer`'s `experts` [...], -1 where absent ([..., S] comparisons)."""
    e_count = state.last_use.shape[1]
    eq = state.slot_key == layer * e_count + experts[..., None]
    return jnp.where(eq.any(-1), jnp.argmax(eq, -1), -1).astype(jnp.int32)


def _slots_mask(slots: jax.Array, where: jax.Array, num_slots: int) -> jax.Array:
    """[S] bool: the slots named by `slots` [...] where `where` [...]."""
    hits = where[..., None] & (slots[..., None] == jnp.arange(num_slots))
    return hits.reshape(-1, num_slots).any(0)


def _predicted_held(state: CacheState, layer: int) -> jax.Array:
    """[S] bool: slots holding an expert of `layer` that its latest prediction names."""
    e_count = state.last_use.shape[1]
    key = state.slot_key
    mine = (key >= 0) & (key // e_count == layer)
    return mine & (state.predicted[layer][jnp.where(mine, key % e_count, 0)] > 0)


def count(state: CacheState, name: str, amount) -> CacheState:
    return state._replace(counts=state.counts.at[COUNTERS.index(name)].add(jnp.asarray(amount, jnp.int32)))


def _victims(state: CacheState, policy: DevicePolicy, protect: jax.Array, n: int, layer: int,
             next_layer: int | None) -> jax.Array:  # fmt: skip
    """[n] slots in eviction order (empty slots first, `protect` [S] never), while `layer` is
    visited (`next_layer`: the next MoE layer, where a scorer predicts)."""
    e_count = state.last_use.shape[1]
    key = state.slot_key
    occupied = key >= 0
    owner, e = jnp.where(occupied, key // e_count, 0), jnp.where(occupied, key % e_count, 0)
    last, uses = state.last_use[owner, e], state.uses[owner, e]
    if policy.name in ("lru", "ondemand"):
        primary = jnp.zeros_like(uses)
    elif policy.name == "lfu":
        primary = uses
    elif policy.name == "lfru":
        primary = uses * jnp.float32(policy.decay) ** (state.tick - last).astype(jnp.float32)
    elif policy.name == "reuse":
        primary = -expected_wait(state, policy, owner, e, layer, next_layer)
    else:  # predictor
        primary = state.predicted[owner, e] * (uses + 1.0)
    primary = jnp.where(occupied, primary, -jnp.inf)
    primary = jnp.where(protect, jnp.inf, primary)
    last = jnp.where(occupied, last, -2)
    order = jnp.lexsort((jnp.arange(key.shape[0]), last, primary))  # the last key sorts first
    return order[: min(n, key.shape[0])]


def expected_wait(state: CacheState, policy: DevicePolicy, owner: jax.Array, e: jax.Array, layer: int,
                   next_layer: int | None) -> jax.Array:  # fmt: skip
    """Layer visits until expert `e` of layer `owner` ([S] each) is expected to be needed, while
    `layer` is visited (offload/reuse.py): d + (1 - q) Lm / p, with d the visits until its
    layer's turn, p its decayed use frequency (the decay that foretold best lately, at least
    `floor`), and q the chance it is needed then: the next layer's latest prediction where it
    names the expert (`predict` keeps the likeliest), else p."""
    moe = policy.moe_layers
    index = np.full(state.last_use.shape[0], len(moe), np.int32)  # MoE index of each layer id
    index[list(moe)] = np.arange(len(moe))
    j, here = jnp.asarray(index)[owner], moe.index(layer)
    r = state.reuse
    freq = r.estimates[jnp.argmin(r.errors)][owner, e]
    q = freq
    if next_layer is not None:
        predicted = state.predicted[next_layer, e]
        q = jnp.where((owner == next_layer) & (predicted > 0), predicted, freq)
    distance = (j - here) % len(moe)
    distance = jnp.where(distance == 0, len(moe), distance).astype(jnp.float32)
    return distance + (1.0 - q) * len(moe) / jnp.maximum(freq, policy.floor)


def _install(state: CacheState, host, layer: int, experts: jax.Array, do: jax.Array, dest: jax.Array,
             prefetched: bool = False) -> CacheState:  # fmt: skip
    """Experts `experts` [W] of `layer` into slots `dest` [W] where `do` [W]: their rows copied from
    the pinned host layer `host` [E, B] (skipped in the simulator); what the slots held is gone.
    `prefetched`: whether they come by a prefetch."""
    e_count = state.last_use.shape[1]
    writes = do[:, None] & (dest[:, None] == jnp.arange(state.slot_key.shape[0]))  # [W, S]
    written = writes.any(0)
    new_key = jnp.max(jnp.where(writes, (layer * e_count + experts)[:, None], -1), axis=0)
    pool = state.pool if host is None else fetch_into(state.pool, host, experts, dest, do)
    return state._replace(pool=pool, slot_key=jnp.where(written, new_key, state.slot_key),
                          prefetched=jnp.where(written, prefetched, state.prefetched))  # fmt: skip


def fetch_into(pool: jax.Array, host: jax.Array, experts: jax.Array, slots: jax.Array, do: jax.Array) -> jax.Array:
    """Inside a program: rows `experts` [W] of the pinned host layer `host` [E, B] into pool slots
    `slots` [W] where `do` [W], in place (one kernel reading host memory per lane, under a
    conditional: a lane that is not taken moves nothing). Compile with FETCH_OPTIONS."""
    for i in range(experts.shape[0]):

        def fetch(pool, i=i):
            row = jax.device_put(jax.lax.dynamic_index_in_dim(host, experts[i], keepdims=False), jax.memory.Space.Device)
            return jax.lax.dynamic_update_index_in_dim(pool, row, slots[i], 0)

        pool = jax.lax.cond(do[i], fetch, lambda pool: pool, pool)
    return pool


def _use(state: CacheState, policy: DevicePolicy, layer: int, experts: jax.Array, need: jax.Array,
         top: int) -> CacheState:  # fmt: skip
    """Experts [U] of `layer` (where `need`) used at the current tick; `top` = K."""
    e_count = state.last_use.shape[1]
    used = (jax.nn.one_hot(experts, e_count, dtype=jnp.bool_) & need[:, None]).any(0)  # [E]
    uses, last = state.uses[layer], state.last_use[layer]
    if policy.name == "lfru":
        uses = uses * jnp.float32(policy.decay) ** (state.tick - last).astype(jnp.float32)
    if policy.name == "reuse":
        state = state._replace(reuse=_reuse_visit(state.reuse, policy, layer, used, top))
    return state._replace(uses=state.uses.at[layer].set(jnp.where(used, uses + 1.0, state.uses[layer])),
                          last_use=state.last_use.at[layer].set(jnp.where(used, state.tick, last)))  # fmt: skip


def _reuse_visit(r: ReuseState, policy: DevicePolicy, layer: int, used: jax.Array, k: int) -> ReuseState:
    """The reuse estimates after a visit of `layer` that used `used` [E] bool (ReuseAware.visit):
    each decay's error, the share of the used experts outside its 2K likeliest, enters its
    recent average; each frequency moves toward this visit by its decay."""
    used = used.astype(jnp.float32)
    est = r.estimates[:, layer]  # [D, E]
    _, likeliest = jax.lax.top_k(est, min(2 * k, est.shape[-1]))  # [D, 2K]
    error = 1.0 - used[likeliest].sum(-1) / jnp.maximum(used.sum(), 1.0)
    errors = r.errors + (error - r.errors) / policy.score_window
    decays = jnp.asarray(policy.decays, jnp.float32)[:, None]
    return ReuseState(r.estimates.at[:, layer].set(est + decays * (used - est)), errors)


def ensure(state: CacheState, host, policy: DevicePolicy, layer: int, ids: jax.Array, valid: jax.Array,
           unique: int, next_layer: int | None = None, weights: jax.Array | None = None,
           ) -> tuple[CacheState, jax.Array]:  # fmt: skip
    """Layer `layer`'s experts for routing ids [N, K] (rows `valid` [N]) in the pool, missing ones
    copied from `host` [E, B]; returns the state and each (row, k)'s pool slot [N, K] (-1 only
    for invalid rows' absent experts, and with `policy.skip_below`, for the skipped ones: see
    `skippable`; routing `weights` [N, K]). `next_layer`: the next MoE layer, whose predicted
    experts (state.predicted) are protected while there is room."""
    e_count = state.last_use.shape[1]
    num_slots = state.slot_key.shape[0]
    state = state._replace(tick=state.tick + 1)
    if policy.name == "ondemand":  # nothing outlives its layer
        state = _drop_other_layers(state, layer)
    wanted = distinct_experts(jnp.where(valid[:, None], ids, e_count), unique, e_count)  # [U]
    need = wanted < e_count
    experts = jnp.minimum(wanted, e_count - 1)
    slot = lookup(state, layer, experts)
    hit, miss = need & (slot >= 0), need & (slot < 0)
    if policy.skip_below > 0 and weights is not None:  # a skipped expert is neither fetched nor used
        skip = miss & skippable(experts, ids, weights, valid, policy.skip_below)
        need, miss = need & ~skip, miss & ~skip
    protect = _slots_mask(slot, hit, num_slots)
    if next_layer is not None:  # the next layer's predicted experts, if the misses still fit without them
        wider = protect | _predicted_held(state, next_layer)
        protect = jnp.where(num_slots - jnp.sum(wider) >= jnp.sum(miss), wider, protect)
    victims = _victims(state, policy, protect, unique, layer, next_layer)
    dest = jnp.where(miss, victims[jnp.clip(jnp.cumsum(miss) - 1, 0, victims.shape[0] - 1)], slot)
    state = _install(state, host, layer, experts, miss, dest)
    used_prefetch = need & state.prefetched[dest]  # installed lanes were just cleared: a miss is not one
    state = state._replace(prefetched=state.prefetched & ~_slots_mask(dest, need, num_slots))
    state = _use(state, policy, layer, experts, need, ids.shape[1])
    hits, needed = jnp.sum(hit), jnp.sum(need)
    rate = hits.astype(jnp.float32) / jnp.maximum(needed, 1).astype(jnp.float32)
    state = state._replace(hit_rate=state.hit_rate + (rate - state.hit_rate) / policy.window)
    state = count(count(count(state, "expert_hits", hits), "expert_misses", jnp.sum(miss)), "prefetch_used",
                   jnp.sum(used_prefetch))  # fmt: skip
    slots = lookup(state, layer, ids)  # [N, K]
    if policy.skip_below > 0 and weights is not None:  # a valid row's absent (row, k) is a skipped one
        state = count(state, "skipped_experts", jnp.sum(valid[:, None] & (slots < 0)))
    return state, slots


def distinct_experts(ids: jax.Array, unique: int, fill: int) -> jax.Array:
    """The distinct values of ids [N, K] padded with `fill` to [U]. One row's top-k are distinct
    already: that row is the answer, with none of `jnp.unique`'s sort, scan and scatter (four
    kernels a layer in a GPU step)."""
    if ids.shape[0] == 1 and unique == ids.shape[1]:
        return ids[0]
    return jnp.unique(ids, size=unique, fill_value=fill)


def skippable(experts: jax.Array, ids: jax.Array, weights: jax.Array, valid: jax.Array, below: float) -> jax.Array:
    """[U] bool: whether each of `experts` [U] may be skipped, i.e. no valid row routes to it
    (ids [N, K], weights [N, K]) with a weight of at least `below` or as its first choice
    (k = 0, the largest weight: a row keeps at least one expert, so a renormalisation never
    divides by zero)."""
    first = jnp.arange(ids.shape[1]) == 0  # [K]
    keeps = valid[:, None] & ((weights.astype(jnp.float32) >= below) | first)  # [N, K]
    return ~((ids[None] == experts[:, None, None]) & keeps[None]).any((1, 2))

def _drop_other_layers(state: CacheState, layer: int) -> CacheState:
    e_count = state.last_use.shape[1]
    keep = (state.slot_key >= 0) & (state.slot_key // e_count == layer)
    return state._replace(slot_key=jnp.where(keep, state.slot_key, -1), prefetched=jnp.zeros_like(state.prefetched))


def begin_token(state: CacheState, policy: DevicePolicy, step: jax.Array, scored: bool) -> tuple[CacheState, jax.Array]:
    """A decode token starts: ([] bool) whether it predicts, with a scorer (`scored`): on every
    k-th token, and while the recent hit rate is below the threshold; a token that does not is
    counted as skipped."""
    if not scored:
        return state, jnp.asarray(False)
    now = (step - 1) % policy.every == 0
    now = now if policy.below is None else now & (state.hit_rate < policy.below)
    return count(state, "predictor_skipped_tokens", ~now), now


def visit(state: CacheState, host, policy: DevicePolicy, layer: int, next_layer: int | None, ids: jax.Array,
          valid: jax.Array, unique: int, now: jax.Array, scores=None, weights: jax.Array | None = None,
          ) -> tuple[CacheState, jax.Array]:  # fmt: skip
    """What the cache does at a MoE layer before its experts compute: where `now` and a scorer
    (`scores`: a thunk giving the next layer's probabilities [N, E]), predict the next layer;
    then `ensure` this layer's experts (routing `weights` [N, K]: what `policy.skip_below`
    compares). The decode step and the simulator both call this."""
    if next_layer is not None and scores is not None:
        state = jax.lax.cond(now, lambda state: predict(state, policy, next_layer, scores(), valid),
                             lambda state: state, state)  # fmt: skip
    return ensure(state, host, policy, layer, ids, valid, unique, next_layer if scores is not None else None,
                  weights)  # fmt: skip


def predict(state: CacheState, policy: DevicePolicy, next_layer: int, probs: jax.Array, valid: jax.Array) -> CacheState:
    """The scorer's probabilities [N, E] for `next_layer` -> its `prefetch` likeliest experts (by
    the best probability any valid row gives one among its top `picks`), which replace that
    layer's prediction."""
    probs, best = jax.lax.top_k(probs.astype(jnp.float32), policy.picks)  # [N, P]
    probs = jnp.where(valid[:, None], probs, 0.0)
    per_expert = jnp.zeros((state.last_use.shape[1],), jnp.float32).at[best].max(probs)  # [E]
    top, chosen = jax.lax.top_k(per_expert, policy.prefetch)
    predicted = jnp.zeros_like(per_expert).at[chosen].set(top)
    return count(state._replace(predicted=state.predicted.at[next_layer].set(predicted)), "predictor_calls", 1)


def prefetch(state: CacheState, host, policy: DevicePolicy, layer: int, next_layer: int, protect_ids: jax.Array,
             valid: jax.Array, now: jax.Array) -> CacheState:  # fmt: skip
    """Where `now` (this token predicted), copy the next layer's predicted experts that are absent
    (best first, at most `prefetch`), never evicting the current layer's experts (routing ids
    [N, K] of rows `valid`) or a predicted one; fewer when nothing else may go."""
    num_slots = state.slot_key.shape[0]
    top, experts = jax.lax.top_k(state.predicted[next_layer], policy.prefetch)  # [P] best first
    wanted = now & (top > 0) & (lookup(state, next_layer, experts) < 0)
    current = lookup(state, layer, protect_ids)  # [N, K]
    protect = _slots_mask(current, valid[:, None] & (current >= 0), num_slots) | _predicted_held(state, next_layer)
    room = num_slots - jnp.sum(protect)
    rank = jnp.cumsum(wanted) - 1
    do = wanted & (rank < room)
    victims = _victims(state, policy, protect, policy.prefetch, layer, next_layer)
    dest = jnp.where(do, victims[jnp.clip(rank, 0, victims.shape[0] - 1)], 0)
    state = _install(state, host, next_layer, experts, do, dest, prefetched=True)
    return count(state, "prefetch_issued", jnp.sum(do))
