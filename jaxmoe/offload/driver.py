"""The decode driver: what a host-planned step run reports -> the cache's plans.

The one code path from a run's report (the layers it computed and their routing ids; where a
layer missed, the scorer's picks for the next MoE layer) to the schedule. The host-planned
decode (engine/offloaded_decode.py: the maps policy, in generate and the server) and the
cache simulator (jaxmoe/predictor/simulate.py) both run it, so simulated counts are the
engine's. It acts at a missed layer (`plan`: demand loads and the prefetches its policy asks
for) and at the token boundary (`end_token`); what it plans there and why: docs/DECODE.md
("The host-planned decode").

Shapes: L layers, N rows (batch), K experts per token, P picks per row, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from jaxmoe.offload.costs import CostModel
from jaxmoe.offload.policy import next_moe_layers
from jaxmoe.offload.schedule import PassPlan, Schedule


@dataclasses.dataclass(frozen=True)
class Amortize:
    every: int = 1  # predict on every k-th decode token (1: on every token)
    below: float | None = None  # ... and only while the recent hit rate is below this
    window: int = 32  # layer visits the recent hit rate averages over (exponential weights)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Amortize.every must be >= 1, got {self.every}")
        if self.below is not None and not 0 < self.below <= 1:
            raise ValueError(f"Amortize.below must be in (0, 1], got {self.below}")

    @property
    def active(self) -> bool:
        """Whether some tokens skip the scorer (the engine then compiles both step programs)."""
        return self.every > 1 or self.below is not None


@dataclasses.dataclass(frozen=True)
class DriverConfig:
    prefetch_max: int = 0  # copies the prefetches of one missed layer may make, in all
    costs: CostModel = CostModel()
    expert_bytes: int | None = None  # the cost model's own (an OLMoE-1B-7B expert) when None
    amortize: Amortize = Amortize()


class Planned(NamedTuple):
    record: list[PassPlan]  # computed layers: count their hits
    load: list[PassPlan]  # the missed layer's demand passes and prefetches: copy them


class DecodeDriver:
    def __init__(self, schedule: Schedule, moe_layers: Sequence[int], num_layers: int, config: DriverConfig):
        self.schedule, self.policy, self.config = schedule, schedule.policy, config
        self.moe_layers, self.num_layers = list(moe_layers), num_layers
        self.order = {layer: j for j, layer in enumerate(self.moe_layers)}
        self.next_moe = next_moe_layers(self.moe_layers)
        self.maps = getattr(self.policy, "expert_maps", None) if self.policy.maps else None
        self.hit_rate = 1.0  # recent, exponentially weighted over layer visits
        self.scorer_calls = 0  # runs whose program ran the scorer (at the layer that missed)
        self.map_calls = 0  # missed layers the expert maps predicted for
        self.skipped = 0  # tokens whose runs did not predict (amortised)
        self.boundary_copies = 0  # token boundaries that copied something (one copy call each)
        self._predict: dict[int, bool] = {}  # step -> whether its runs predict
        self._tokens: dict[int, np.ndarray | None] = {}  # step -> input token of each row
        self._step, self._rows = None, {}  # the token being planned; row -> {layer index: experts}
        self._vector, self._gain = None, {}
        # How often the scorer's r-th pick was used at the next layer (a Beta(1, 1) start):
        # a pick's probability is the router's softmax, not its chance of being chosen.
        self._rank_hits, self._rank_trials = np.ones(0), np.ones(0)
        self._pending: tuple | None = None  # (step, layer, {row: picks}) awaiting that layer's routing
        # This request's expert uses, for its request map.
        self._usage = np.zeros((len(self.moe_layers), self.maps.e if self.maps else 0))

    # -- per request and per token ---------------------------------------------------
    def begin_request(self, vector: np.ndarray | None = None) -> None:
        """A new request (a generate call) starts; `vector`: its prompt's semantic vector,
        for a policy with expert maps (the maps of similar requests become its prior)."""
        self._vector = vector
        # Steps count again from 1: nothing planned for the last request's steps carries over.
        self._predict, self._tokens, self._step, self._pending = {}, {}, None, None
        if self.maps is None:
            return
        self._usage = np.zeros((len(self.moe_layers), self.maps.e))
        prior = None if vector is None else self.maps.request_prior(vector)
        if prior is not None:
            self.policy.set_prior(prior)

    def end_request(self) -> None:
        """Store the finished request's map (with a semantic vector, for a maps policy)."""
        if self.maps is not None and self._vector is not None and self._usage.sum() > 0:
            visits = max(1.0, self._usage.sum() / max(1, self.maps.k * len(self.moe_layers)))
            self.maps.add_request(self._vector, self._usage / visits)

    def begin_token(self, step: int, tokens: np.ndarray | None = None) -> bool:
        """Before a token's first run is dispatched: whether its runs predict (amortised
        prediction); `tokens` [N]: each row's input token (for expert maps)."""
        if step in self._predict:  # begun already (the engine dispatched it ahead, or planned its boundary)
            return self._predict[step]
        a = self.config.amortize
        predict = (step - 1) % a.every == 0 and (a.below is None or self.hit_rate < a.below)
        self._predict = {s: v for s, v in self._predict.items() if s >= step - 1}
        self._tokens = {s: v for s, v in self._tokens.items() if s >= step - 1}
        self._predict[step], self._tokens[step] = predict, None if tokens is None else np.asarray(tokens)
        self.skipped += not predict
        return predict

    def counts(self) -> dict:
        """What prediction cost so far (cumulative; the engine reports a generate's difference)."""
        return {"predictor_calls": self.scorer_calls, "map_calls": self.map_calls,
                "predictor_skipped_tokens": self.skipped, "boundary_copies": self.boundary_copies}  # fmt: skip

    def predicting(self, step: int) -> bool:
        return self._predict.get(step, True)

    # -- one run ----------------------------------------------------------------------
    def plan(self, step: int, start: int, first_miss: int, ids: np.ndarray, picks: np.ndarray, probs: np.ndarray,
             valid: np.ndarray, planned: int | None) -> Planned:  # fmt: skip
        """One run's outputs -> plans. ids [L, N, K]; picks, probs [L, N, P] (P = 0: no
        scorer in the program); valid [N]: live rows; `planned`: the layer this run resumed
        at (planned when it missed)."""
        if step != self._step:
            self._step, self._rows = step, {r: {} for r in np.flatnonzero(valid)}
        record: list[PassPlan] = []
        for layer in self.moe_layers:
            if not start <= layer <= first_miss or layer == planned:
                continue
            needed = np.unique(ids[layer][valid])
            for r in self._rows:
                self._rows[r][self.order[layer]] = [int(e) for e in ids[layer][r]]
            self._calibrate(step, layer)
            if layer < first_miss:  # computed: every expert it used was cached
                (plan,) = self.schedule.plan_layer(step, layer, needed)
                if plan.loads:
                    raise AssertionError(f"layer {layer} computed with experts {plan.loads} missing from the table")
                self._hits(plan, len(needed))
                record.append(plan)
                continue
            self.scorer_calls += picks.shape[-1] > 0
            plans = self._plan_miss(step, layer, needed, picks[layer], probs[layer], valid)
            self._hits(plans[0], len(needed))
            return Planned(record, plans)
        if first_miss == self.num_layers:
            self._learn(step)
        return Planned(record, [])

    def _calibrate(self, step: int, layer: int) -> None:
        """Score the picks made for `layer` against its routing, now known."""
        if self._pending is None or self._pending[:2] != (step, layer):
            return
        for r, picks in self._pending[2].items():
            used = set(self._rows.get(r, {}).get(self.order[layer], ()))
            for rank, e in enumerate(picks):
                self._rank_trials[rank] += 1
                self._rank_hits[rank] += int(e) in used
        self._pending = None

    def pick_probability(self, count: int) -> np.ndarray:
        """[count]: the observed chance that the scorer's r-th pick is used at the next layer."""
        if len(self._rank_trials) < count:
            grow = count - len(self._rank_trials)
            self._rank_hits = np.concatenate([self._rank_hits, np.ones(grow)])
            self._rank_trials = np.concatenate([self._rank_trials, 2 * np.ones(grow)])
        return self._rank_hits[:count] / self._rank_trials[:count]

    def _hits(self, plan: PassPlan, needed: int) -> None:
        w = 1.0 / self.config.amortize.window
        self.hit_rate += w * (len(plan.hits) / max(1, needed) - self.hit_rate)

    def _learn(self, step: int) -> None:
        """A finished token: the maps learn each row's routing."""
        if self.maps is None:
            return
        tokens = self._tokens.get(step)
        for r, layers in self._rows.items():
            if len(layers) != len(self.moe_layers):
                continue
            experts = [layers[j] for j in range(len(self.moe_layers))]
            self.maps.add_token(None if tokens is None else int(tokens[r]), experts)
            for j, es in enumerate(experts):
                self._usage[j, es] += 1

    # -- the token boundary -------------------------------------------------------------
    @property
    def boundary(self) -> bool:
        """Whether the host plans prefetches between tokens (the engine then plans before it
        dispatches the next token, not while it runs)."""
        return self.policy.boundary and self.maps is not None and self.config.prefetch_max > 0

    def end_token(self, step: int, tokens: np.ndarray | None, valid: np.ndarray) -> list[PassPlan]:
        """After the token before `step` completed and was recorded (`plan`), and begin_token(step):
        the prefetches for `step`'s layers from its input tokens [N] (rows `valid`), by the
        maps and the cost gate; [] where nothing pays, or the step does not predict."""
        if not self.boundary or tokens is None or not self.predicting(step):
            return []
        rows = np.flatnonzero(valid)
        targets = list(range(len(self.moe_layers)))
        per_row = np.stack([self.maps.predict(int(tokens[r]), {}, targets) for r in rows])  # [N, Lm, E]
        union = 1.0 - np.prod(1.0 - per_row, axis=0)  # [Lm, E]: some live row needs it
        predicted = {m: union[j] for j, m in enumerate(self.moe_layers)}
        self.policy.next_token()
        for m, q in predicted.items():
            self.policy.observe(m, q)
        self.map_calls += 1
        chosen = self.choose_prefetch(predicted)
        plans = self._prefetch(step, chosen, [(m, e) for m, es in chosen for e in es])
        self.boundary_copies += any(p.loads for p in plans)
        return plans

    # -- a missed layer -----------------------------------------------------------------
    def _plan_miss(self, step, layer, needed, picks, probs, valid) -> list[PassPlan]:
        if self.policy.prefetch == "none":
            return self.schedule.plan_layer(step, layer, needed, resume=True)
        if self.policy.prefetch == "next":
            return self._plan_next(step, layer, needed, picks, probs, valid)
        predicted = self._predict_later(step, layer, picks, probs, valid)
        for m, q in predicted.items():
            self.policy.observe(m, q)
        prefetch = self.choose_prefetch(predicted)
        protect = [(m, e) for m, es in prefetch for e in es]
        plans = self.schedule.plan_layer(step, layer, needed, protect, resume=True)
        return plans + self._prefetch(step, prefetch, [(layer, int(e)) for e in needed] + protect)

    def _prefetch(self, step, chosen: list[tuple[int, list[int]]], protect: list) -> list[PassPlan]:
        """Prefetch passes for `chosen` (layer, experts), in order, within prefetch_max copies;
        `protect`: keys no copy may evict."""
        room, plans = self.config.prefetch_max, []
        for m, es in chosen:
            if room <= 0:
                break
            plan = self.schedule.plan_prefetch(step, m, es, protect, limit=room, accept=self._accept)
            room -= len(plan.loads)
            plans.append(plan)
        return plans

    def _plan_next(self, step, layer, needed, picks, probs, valid) -> list[PassPlan]:
        """The next layer's top predictions, shown to the policy and prefetched (PredictorAware)."""
        nxt = self.next_moe.get(layer)
        predicted = []
        if picks.shape[-1] and nxt is not None:
            best: dict[int, float] = {}
            for e, p in zip(picks[valid].ravel(), probs[valid].ravel()):
                best[int(e)] = max(best.get(int(e), 0.0), float(p))
            predicted = sorted(best, key=lambda e: (-best[e], e))[: self.config.prefetch_max]
            self.policy.observe(nxt, {e: best[e] for e in predicted})
        plans = self.schedule.plan_layer(step, layer, needed, [(nxt, e) for e in predicted], resume=True)
        if predicted:
            plans.append(self.schedule.plan_prefetch(step, nxt, predicted, [(layer, int(e)) for e in needed]))
        return plans

    def _predict_later(self, step, layer, picks, probs, valid) -> dict[int, np.ndarray]:
        """layer -> [E] chance that some live row needs each expert there, for the MoE layers
        after `layer` in this token: the scorer's for the next one, the maps' for all."""
        nxt = self.next_moe.get(layer)
        if nxt is None or not self.predicting(step):
            return {}
        k, e_count = self.policy.shape.top_k, self.policy.shape.num_experts
        rows = np.flatnonzero(valid)
        later = self.moe_layers[self.order[layer] + 1 :]
        per_row = np.zeros((len(rows), len(later), e_count))  # chance row r needs expert e at a later layer
        used = False
        if self.maps is not None:
            tokens = self._tokens.get(step)
            for i, r in enumerate(rows):
                token = None if tokens is None else int(tokens[r])
                per_row[i] = self.maps.predict(token, self._rows.get(r, {}), [self.order[m] for m in later])
            self.map_calls += 1
            used = True
        if picks.shape[-1]:
            q = self.pick_probability(picks.shape[-1])
            self._pending = (step, nxt, {int(r): [int(e) for e in picks[r]] for r in rows})
            if self.maps is None:  # the experts not picked share what the picks leave of K
                per_row[:, 0] = max(0.0, k - q.sum()) / max(1, e_count - len(q))
            for i, r in enumerate(rows):
                per_row[i, 0, picks[r]] = q
            used = True
        if not used:
            return {}
        union = 1.0 - np.prod(1.0 - per_row, axis=0)  # [later, E]
        if self.maps is None:
            union = union[:1]
        return {m: union[i] for i, m in enumerate(later[: len(union)])}

    def choose_prefetch(self, predicted: dict[int, np.ndarray]) -> list[tuple[int, list[int]]]:
        """Later layers' experts worth copying now, by the cost model; at most prefetch_max.

        Layer m runs without a resume when none of the experts it needs is absent; under
        independent needs that chance is the product of (1 - q) over its absent experts,
        and copying its n likeliest absent experts divides it by their (1 - q). A resume
        saved at m is worth `resume_ms` if the program reaches m without resuming
        earlier (otherwise that earlier resume could copy m's experts with more known):
        the product of the earlier layers' chances. Copies are worth it only together
        (with K experts a layer, one copy alone rarely completes it), so for each layer
        in order the count n with the largest expected saving over the expected waste
        ((1 - q) of a copy's time each) is taken, if it pays."""
        costs = self.config.costs
        copy_ms, resume_ms = costs.expert_ms(self.config.expert_bytes), costs.resume_ms()
        row = {m: i for i, m in enumerate(predicted)}
        cached = np.zeros((len(predicted), self.policy.shape.num_experts), bool)
        for m, e in self.schedule.slot_of:
            if m in row:
                cached[row[m], e] = True
        reach, room, out, self._gain = 1.0, self.config.prefetch_max, [], {}
        for m, q in predicted.items():
            q = np.minimum(q, 1.0 - 1e-6)
            order = np.argsort(-q, kind="stable")
            absent = order[~cached[row[m], order]]
            complete = float(np.prod(1.0 - q[absent]))  # chance m needs none of its absent experts
            take = absent[:room]
            # With the n likeliest copied (n = 0..room): the saving and the waste.
            completes = complete / np.concatenate([[1.0], np.cumprod(1.0 - q[take])])
            waste = np.concatenate([[0.0], np.cumsum(1.0 - q[take])]) * copy_ms
            net = reach * (completes - complete) * resume_ms - waste
            n = int(np.argmax(net))
            if n:
                out.append((m, take[:n].tolist()))
                self._gain.update({(m, int(e)): float(q[e]) for e in take[:n]})
                room -= n
            reach *= completes[n]
            if room <= 0:
                break
        return out

    def _accept(self, key, victim) -> bool:
        """Whether prefetching `key` is worth evicting `victim`: not if the victim is likelier
        to be needed at its next visit than `key` at its own (its reload would cost a copy
        more often than the prefetch saves one)."""
        return self.policy.need_probability(victim) < self._gain.get(key, 0.0)
