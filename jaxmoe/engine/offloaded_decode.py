"""Offloaded decode: one program per token while its experts are cached, a host round
trip only where one is missing.

Per token the host dispatches the step program (engine/step.py) from layer 0 and reads
its small outputs once: the first layer that missed an expert, every layer's routing
ids, the predictor's picks. The schedule records each completed layer's experts as hits
(the policy sees all layers' routing at once). If a layer missed, the schedule plans its
loads (and, with a predictor, the next MoE layer's predicted experts), the cache copies
them and writes them into the pool (the copies are issued before that write program, so
the host never waits on a copy), and the same program runs again from that layer with
the hidden state it kept. A token costs 1 + (layers that missed) programs and host reads.

Shapes: B batch, D hidden, L layers, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.step import decode_step
from jaxmoe.model import init_kv_cache
from jaxmoe.offload.cache import pool_experts, write_slots

DONATE = (3, 4)  # the KV cache and the pool: updated in place


def offloaded_step(model, tok, positions, valid, kv, pool, staged, staged_slots, table, start, x_start, root, step,
                   scorer_leaves, *, sampling, scorer, picks, fmt):  # fmt: skip
    """decode_step on tok [B] at positions [B] with the cache's pool standing for every MoE
    layer's experts, after writing into the pool (in place) the copies the cache staged;
    also returns the pool, and the next step's positions and step (used after a run that
    completed the token), so the host feeds device arrays straight back in."""
    pool = write_slots(pool, staged, staged_slots)
    experts = [pool_experts(pool, fmt, model.cfg) if moe else None for moe in model.cfg.moe_layers]
    out = decode_step(model, tok[:, None], positions[:, None], valid, kv, experts, table, start, x_start, root,
                      step, scorer_leaves, sampling=sampling, scorer=scorer, picks=picks)  # fmt: skip
    # What the host reads, as one int32 array (one transfer): first miss, tokens, routing ids,
    # picks; the picks' probabilities apart (fp32).
    report = jnp.concatenate([out.first_miss[None], out.token, out.ids.reshape(-1), out.picks.reshape(-1)])
    return out, pool, report, out.probs, positions + 1, step + 1


def read_report(report: np.ndarray, layers: int, batch: int, k: int, picks: int):
    """The host side of offloaded_step's report: (first_miss, tokens [B], ids [L, B, K], picks [L, B, P])."""
    ids_end = 1 + batch + layers * batch * k
    return (int(report[0]), report[1 : 1 + batch], report[1 + batch : ids_end].reshape(layers, batch, k),
            report[ids_end:].reshape(layers, batch, picks))  # fmt: skip


@dataclasses.dataclass
class DecodeCounters:
    tokens: int = 0
    runs: int = 0  # step programs dispatched (one host read each)
    resumes: int = 0  # runs that started past layer 0
    stall_s: float = 0.0  # host reads of runs that followed a load: waiting for copies and the rest


class OffloadedDecoder:
    """Drives one generate's decode steps through an engine's cache and step program."""

    def __init__(self, engine, sampling):
        self.engine, self.cfg, self.sampling = engine, engine.config, sampling
        self.counters = DecodeCounters()
        self.moe_layers = [m for m in range(self.cfg.num_layers) if self.cfg.moe_layers[m]]

    def static(self) -> dict:
        predictor = self.engine.predictor if self.engine.cache.prefetch_max > 0 else None
        return {"sampling": self.sampling, "scorer": predictor, "picks": self.cfg.top_k if predictor else 0,
                "fmt": self.engine.store.format}  # fmt: skip

    def args(self, tok, positions, valid, kv, start, x_start, root, step, cache_inputs) -> tuple:
        static = self.static()
        leaves = static["scorer"].leaves if static["scorer"] else ()
        return (tok, positions, valid, tuple(kv), *cache_inputs, start, x_start, root, step, leaves)

    def compile(self, batch: int, cache_len: int) -> None:
        """The step program for this batch from shapes (prepare)."""
        spec, cfg = jax.ShapeDtypeStruct, self.cfg
        rows = spec((batch,), jnp.int32)
        kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len))
        cache = self.engine.cache
        plain = lambda tree: jax.tree.map(lambda a: spec(a.shape, a.dtype), tree)  # noqa: E731
        cache_inputs = plain((cache.pool, (cache.filler,) * cache.staging, jnp.zeros(cache.staging, jnp.int32),
                              jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.int32)))  # fmt: skip
        args = self.args(rows, rows, spec((batch,), jnp.bool_), kv, spec((), jnp.int32),
                         spec((batch, 1, cfg.hidden_size), jnp.dtype(cfg.dtype)),
                         jax.eval_shape(lambda: jax.random.key(0)), spec((), jnp.int32), cache_inputs)  # fmt: skip
        self.engine.executor.compile("step", offloaded_step, self.static(), DONATE, self.engine.model_piece, *args)

    def start(self, positions: np.ndarray, max_new_tokens: int) -> None:
        """Before the first decode step: the rows' positions [B] (the prompt lengths)."""
        self._positions, self._step = jnp.asarray(positions, jnp.int32), jnp.int32(1)
        self._valid_host, self._valid = None, None
        self._ahead = None  # (step, run) dispatched before the previous token's bookkeeping
        self.max_new_tokens = max_new_tokens
        # Dispatching ahead assumes recording hits moves no slot; a policy that evicts every
        # other layer as it goes (ondemand) would move slots the run ahead already used.
        self.dispatch_ahead = not self.engine.cache.schedule.policy.keep_only_current
        self._program = None

    def _dispatch(self, tok, kv: list, start: int, x_start, root):
        engine, b = self.engine, tok.shape[0]
        x_start = engine.zeros((b, 1, self.cfg.hidden_size)) if x_start is None else x_start
        args = self.args(tok, self._positions, self._valid, kv, engine.scalar(start), x_start, root, self._step,
                         engine.cache.step_inputs())  # fmt: skip
        if self._program is None:  # looked up once per generate: a lookup per call costs a signature
            self._program = engine.executor.compile("step", offloaded_step, self.static(), DONATE, engine.model_piece,
                                                    *args)  # fmt: skip
        with engine.executor.clock.phase("dispatch"):
            out, pool, *run = self._program(engine.model_piece.leaves, *args)
        engine.executor.clock.device("compute", out)
        kv[:] = out.kv
        engine.cache.step_outputs(pool)
        return (out, *run)

    def token(self, step: int, tok: jax.Array, valid: np.ndarray, kv: list, root):
        """One decode step for tok [B] (on the device); `valid` [B] marks rows still
        generating. kv is updated in place. Returns the next token on the device and on
        the host. A completed token dispatches the next one's run before its own
        bookkeeping, so the device computes while the host plans."""
        cache, clock = self.engine.cache, self.engine.executor.clock
        if self._valid_host is None or not np.array_equal(valid, self._valid_host):  # rows finish rarely
            self._valid_host, self._valid = valid.copy(), jnp.asarray(valid)
        if self._ahead is not None and self._ahead[0] == step:
            run, self._ahead = self._ahead[1], None
        else:
            run = self._dispatch(tok, kv, 0, None, root)
        start, loaded, planned = 0, False, None
        picks_n = self.static()["picks"]
        while True:
            out, report, probs, next_positions, next_step = run
            read_start = time.perf_counter()
            with clock.phase("host_read"):  # the one host read of this run
                report, probs = jax.device_get((report, probs)) if picks_n else (np.asarray(report), None)
            first_miss, tok_host, ids, picks = read_report(report, self.cfg.num_layers, len(valid), self.cfg.top_k,
                                                           picks_n)  # fmt: skip
            if loaded:
                self.counters.stall_s += time.perf_counter() - read_start
            self.counters.runs += 1
            self.counters.resumes += planned is not None
            if first_miss == self.cfg.num_layers:
                self.counters.tokens += 1
                self._positions, self._step = next_positions, next_step
                if self.dispatch_ahead and step + 1 < self.max_new_tokens:
                    self._ahead = (step + 1, self._dispatch(out.token, kv, 0, None, root))
                with clock.phase("schedule"):
                    self._plan(step, start, first_miss, ids, picks, probs, valid, planned)
                return out.token, tok_host
            with clock.phase("schedule"):
                plans = self._plan(step, start, first_miss, ids, picks, probs, valid, planned)
            loaded = cache.load(plans)
            start, planned = first_miss, first_miss
            run = self._dispatch(tok, kv, start, out.x_miss, root)

    def _plan(self, step, start, first_miss, ids, picks, probs, valid, planned) -> list:
        """Record the completed layers' hits; for a missed layer, its loads and the next MoE
        layer's predicted experts."""
        schedule, cache = self.engine.cache.schedule, self.engine.cache
        for layer in self.moe_layers:
            # The layer a run resumed at was planned (and counted) when it missed.
            if not start <= layer <= first_miss or layer == planned:
                continue
            needed = np.unique(ids[layer][valid])
            nxt = self.engine.next_moe[layer]
            if layer < first_miss:  # computed: every expert it used was cached
                (plan,) = schedule.plan_layer(step, layer, needed)
                if plan.loads:
                    raise AssertionError(f"layer {layer} computed with experts {plan.loads} missing from the table")
                cache.record(plan)
                continue
            # Made where it missed; none without a scorer.
            predicted = [] if probs is None else self._predicted(layer, picks[layer], probs[layer], valid)
            plans = schedule.plan_layer(step, layer, needed, [(nxt, e) for e in predicted], resume=True)
            if predicted:
                plans.append(schedule.plan_prefetch(step, nxt, predicted, [(layer, e) for e in needed]))
            return plans
        return []

    def _predicted(self, layer: int, picks: np.ndarray, probs: np.ndarray, valid: np.ndarray) -> list[int]:
        """The next MoE layer's most probable experts (the union over live rows, best first,
        at most prefetch_max), shown to the policy."""
        cache, nxt = self.engine.cache, self.engine.next_moe[layer]
        if not picks.shape[-1] or nxt is None:
            return []
        best: dict[int, float] = {}
        for e, p in zip(picks[valid].ravel(), probs[valid].ravel()):
            best[int(e)] = max(best.get(int(e), 0.0), float(p))
        ranked = sorted(best, key=lambda e: (-best[e], e))[: cache.prefetch_max]
        cache.schedule.policy.observe(nxt, {e: best[e] for e in ranked})
        return ranked
