"""Offloaded decode planned on the host (the maps policy, also in the server's rows):
one program per token while its experts are cached, a host round trip only where one is
missing. The other policies run engine/device_decode.py, which never returns for a miss.

Per token the host dispatches the step program (engine/step.py) from layer 0 and reads
its small outputs once: the first layer that missed an expert, every layer's routing
ids, the predictor's picks. The decode driver (jaxmoe/offload/driver.py, the code the
cache simulator runs too) records each completed layer's experts as hits and, if a
layer missed, plans its loads and the prefetches its policy asks for; the cache copies
them into the pool (a fetch program dispatched before the step program, so the host never
waits on a copy), and the same program runs again from that layer with
the hidden state it kept. A token costs 1 + (layers that missed) programs and host reads.
With amortised prediction the driver decides per token whether its runs carry the
scorer; a token that does not predict runs the program compiled without it.

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
from jaxmoe.offload.cache import pool_experts

DONATE = (3, 4)  # the KV cache and the pool: updated in place


def offloaded_step(model_at, tok, positions, valid, kv, pool, table, start, x_start, root, step,
                   scorer_leaves, *, sampling, scorer, picks, fmt, **step_options):  # fmt: skip
    """decode_step on tok [B] at positions [B] with the cache's pool standing for every MoE
    layer's experts; also returns the pool (passed through, donated), and the next step's
    positions and step (used after a run that completed the token), so the host feeds device
    arrays straight back in. `model_at`: the model, merged where it is called (decode_step's
    `merge`; the executor's `lazy`). `step_options`: decode_step's own (the server's per-row
    `moe_fn` and `sampler`)."""
    model = model_at(None)
    experts = [pool_experts(pool, fmt, model.cfg) if moe else None for moe in model.cfg.moe_layers]
    out = decode_step(model, tok[:, None], positions[:, None], valid, kv, experts, table, start, x_start, root,
                      step, scorer_leaves, sampling=sampling, scorer=scorer, picks=picks, merge=model_at,
                      **step_options)  # fmt: skip
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

    program_name, step_program = "step", staticmethod(offloaded_step)  # the server's rows swap these
    skipped_experts = 0  # planned on the host: it decodes exactly (no --skip-below)

    def __init__(self, engine, sampling):
        self.engine, self.cfg, self.sampling = engine, engine.config, sampling
        self.counters = DecodeCounters()
        self.predict = True  # whether the token being run predicts (amortised prediction: the driver says)

    def static(self) -> dict:
        """The step program's static arguments; without the scorer for a token that does not predict."""
        room = self.engine.cache.schedule.prefetch_staging > 0
        predictor = self.engine.predictor if room and self.predict else None
        return {"sampling": self.sampling, "scorer": predictor, "picks": self.cfg.top_k if predictor else 0,
                "fmt": self.engine.store.format}  # fmt: skip

    def args(self, tok, positions, valid, kv, start, x_start, root, step, cache_inputs) -> tuple:
        static = self.static()
        leaves = static["scorer"].leaves if static["scorer"] else ()
        return (tok, positions, valid, tuple(kv), *cache_inputs, start, x_start, root, step, leaves)

    def compile(self, batch: int, cache_len: int) -> None:
        """The step program for this batch from shapes (prepare); with amortised prediction
        also its variant without the scorer."""
        spec, cfg = jax.ShapeDtypeStruct, self.cfg
        rows = spec((batch,), jnp.int32)
        kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len))
        cache = self.engine.cache
        plain = lambda tree: jax.tree.map(lambda a: spec(a.shape, a.dtype), tree)  # noqa: E731
        cache_inputs = plain((cache.pool, jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.int32)))
        for self.predict in (True, False) if self.engine.amortize.active else (True,):
            args = self.args(rows, rows, spec((batch,), jnp.bool_), kv, spec((), jnp.int32),
                             spec((batch, 1, cfg.hidden_size), jnp.dtype(cfg.dtype)),
                             jax.eval_shape(lambda: jax.random.key(0)), spec((), jnp.int32), cache_inputs)  # fmt: skip
            self.engine.executor.compile(self.program_name, self.step_program, self.static(), DONATE,
                                         self.engine.model_piece, *args, lazy=True)  # fmt: skip
        self.predict = True

    def start(self, positions: np.ndarray, max_new_tokens: int, first_tokens: np.ndarray | None = None) -> None:
        """Before the first decode step: the rows' positions [B] (the prompt lengths) and the
        tokens the prefill sampled (the first step's input, on the host, for expert maps)."""
        self._positions, self._step = jnp.asarray(positions, jnp.int32), jnp.int32(1)
        self._tokens_host = first_tokens
        self._valid_host, self._valid = None, None
        self._ahead = None  # (step, run) dispatched before the previous token's bookkeeping
        self._ahead_loaded = False  # the boundary copied for the next token
        self.max_new_tokens = max_new_tokens
        # Dispatching ahead assumes recording hits moves no slot; a policy that evicts every
        # other layer as it goes (ondemand) would move slots the run ahead already used.
        self.dispatch_ahead = not self.engine.cache.schedule.policy.keep_only_current
        self._programs = {}  # predict -> compiled step program

    def _dispatch(self, tok, kv: list, start: int, x_start, root):
        engine, b = self.engine, tok.shape[0]
        x_start = engine.zeros((b, 1, self.cfg.hidden_size)) if x_start is None else x_start
        args = self.args(tok, self._positions, self._valid, kv, engine.scalar(start), x_start, root, self._step,
                         engine.cache.step_inputs())  # fmt: skip
        program = self._programs.get(self.predict)
        if program is None:  # looked up once per generate: a lookup per call costs a signature
            program = self._programs[self.predict] = engine.executor.compile(
                self.program_name, self.step_program, self.static(), DONATE, engine.model_piece, *args,
                lazy=True)  # fmt: skip
        with engine.executor.clock.phase("dispatch"):
            out, pool, *run = program(engine.model_piece.leaves, *args)
        engine.executor.clock.device("compute", out)
        kv[:] = out.kv
        engine.cache.step_outputs(pool)
        return (out, *run)

    def _begin(self, step: int, tokens) -> None:
        """Before a token's first run: the driver says whether it predicts (its runs' program)."""
        self.predict = self.engine.driver.begin_token(step, tokens)

    def token(self, step: int, tok: jax.Array, valid: np.ndarray, kv: list, root):
        """One decode step for tok [B] (on the device); `valid` [B] marks rows still
        generating. kv is updated in place. Returns the next token on the device and on
        the host. A completed token dispatches the next one's run before its own
        bookkeeping, so the device computes while the host plans."""
        cache, clock = self.engine.cache, self.engine.executor.clock
        if self._valid_host is None or not np.array_equal(valid, self._valid_host):  # rows finish rarely
            self._valid_host, self._valid = valid.copy(), jnp.asarray(valid)
        driver = self.engine.driver
        self._begin(step, self._tokens_host)  # begun already where it was dispatched ahead
        if self._ahead is not None and self._ahead[0] == step:
            run, self._ahead = self._ahead[1], None
        else:
            run = self._dispatch(tok, kv, 0, None, root)
        # A run after copies (the boundary's) waits for them: its read counts as a stall.
        start, loaded, planned, self._ahead_loaded = 0, self._ahead_loaded, None, False
        picks_n = self.static()["picks"]
        while True:
            out, report, probs, next_positions, next_step = run
            read_start = time.perf_counter()
            with clock.phase("host_read"):  # the one host read of this run
                report, probs = jax.device_get((report, probs)) if picks_n else (np.asarray(report), None)
            first_miss, tok_host, ids, picks = read_report(report, self.cfg.num_layers, len(valid), self.cfg.top_k,
                                                           picks_n)  # fmt: skip
            probs = np.zeros(picks.shape, np.float32) if probs is None else probs
            if loaded:
                self.counters.stall_s += time.perf_counter() - read_start
            self.counters.runs += 1
            self.counters.resumes += planned is not None
            if first_miss == self.cfg.num_layers:
                self.counters.tokens += 1
                self._positions, self._step = next_positions, next_step
                self._tokens_host = tok_host  # the next step's input
                ahead = self.dispatch_ahead and step + 1 < self.max_new_tokens
                # The boundary's copies ride with the next token's first program, so only where
                # this decoder dispatches it (a server's next rows are not known here).
                boundary = driver.boundary and self.dispatch_ahead
                if boundary:  # record, then plan the next token's copies, before dispatching it
                    with clock.phase("schedule"):
                        self._plan(step, start, first_miss, ids, picks, probs, valid, planned)
                        if ahead:
                            self._begin(step + 1, tok_host)
                            self._ahead_loaded = cache.load(driver.end_token(step + 1, tok_host, valid))
                if ahead:
                    self._begin(step + 1, tok_host)  # a no-op where the boundary began it
                    self._ahead = (step + 1, self._dispatch(out.token, kv, 0, None, root))
                if not boundary:
                    with clock.phase("schedule"):
                        self._plan(step, start, first_miss, ids, picks, probs, valid, planned)
                return out.token, tok_host
            with clock.phase("schedule"):
                plans = self._plan(step, start, first_miss, ids, picks, probs, valid, planned)
            loaded = cache.load(plans)
            start, planned = first_miss, first_miss
            run = self._dispatch(tok, kv, start, out.x_miss, root)

    def finish(self) -> None:
        """After the last step: nothing to hand back (the driver keeps the counts)."""
        return None

    def _plan(self, step, start, first_miss, ids, picks, probs, valid, planned) -> list:
        """The decode driver's plans for this run: the completed layers' hits are counted
        here, the missed layer's loads (and prefetches) are returned for the cache to copy."""
        planned_now = self.engine.driver.plan(step, start, first_miss, ids, picks, probs, valid, planned)
        for plan in planned_now.record:
            self.engine.cache.record(plan)
        return planned_now.load
