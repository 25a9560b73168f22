"""Offloaded decode with the cache on the device: one program per token, one host read.

Per token the host dispatches the step program (engine/device_step.py) and reads the
sampled tokens; every miss, eviction and prefetch happens inside the program, so the
host never waits on a report to continue a token. The cache's state (pool, slot
owners, policy arrays, counters) is one pytree that each step takes and returns (donated, so the
pool is written in place); the host reads the counters and the slot owners once, when the
generate ends, and hands the slots back to the cache's schedule (the next prefill plans
with them).

Used for the policies the device can run (device_cache.DEVICE_POLICIES); the policies
whose planning lives on the host (maps) runs engine/offloaded_decode.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.device_step import device_step_at
from jaxmoe.engine.offloaded_decode import DecodeCounters  # resumes and stall stay 0: a miss never leaves the program
from jaxmoe.model import init_kv_cache
from jaxmoe.offload import device_cache as dc

DONATE = (3, 4)  # the KV cache and the cache state (its pool): updated in place


def device_policy(engine) -> dc.DevicePolicy:
    """The engine's policy as the device runs it."""
    cfg, schedule = engine.config, engine.cache.schedule
    prefetch = schedule.prefetch_staging if engine.predictor is not None else 0
    a = engine.amortize
    return dc.DevicePolicy.of(schedule.policy, cfg.moe_layer_ids, prefetch=prefetch, picks=cfg.top_k if prefetch else 0,
                              every=a.every, below=a.below, window=a.window, skip_below=engine.skip_below)  # fmt: skip


class DeviceDecoder:
    """Drives one generate's decode steps with the cache's state on the device."""

    program_name, step_program = "device_step", staticmethod(device_step_at)
    skipped_experts = 0  # (row, k) the approximate decode did not compute; read in finish()
    counts_each_step = False  # copy the counters with each token (for a caller that reads them every step)

    def __init__(self, engine, sampling):
        self.engine, self.cfg, self.sampling = engine, engine.config, sampling
        self.counters = DecodeCounters()
        self.policy = device_policy(engine)

    def static(self) -> dict:
        scorer = self.engine.predictor if self.policy.prefetch else None
        return {"sampling": self.sampling, "policy": self.policy, "fmt": self.engine.store.format, "scorer": scorer}

    def _args(self, tok, positions, valid, kv, state, root, step) -> tuple:
        scorer = self.static()["scorer"]
        leaves = scorer.leaves if scorer is not None else ()
        return (tok, positions, valid, tuple(kv), state, self.engine.store.layers(), root, step, leaves)

    def _program(self, *args):
        engine = self.engine
        return engine.executor.compile(self.program_name, self.step_program, self.static(), DONATE, engine.model_piece,
                                       *args, options=dc.FETCH_OPTIONS, lazy=True)  # fmt: skip

    def compile(self, batch: int, cache_len: int) -> None:
        """The step program for this batch from shapes (prepare)."""
        spec, cfg = jax.ShapeDtypeStruct, self.cfg
        rows = spec((batch,), jnp.int32)
        kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len))
        state = jax.eval_shape(self.engine.cache.device_state)
        root = jax.eval_shape(lambda: jax.random.key(0))
        self._program(*self._args(rows, rows, spec((batch,), jnp.bool_), kv, state, root, spec((), jnp.int32)))

    def start(self, positions: np.ndarray, max_new_tokens: int, first_tokens: np.ndarray | None = None) -> None:
        """Before the first decode step: the rows' positions [B] (the prompt lengths)."""
        self.place(positions)
        self._step = jnp.int32(1)
        self._valid_host, self._valid = None, None
        self._state = self.engine.cache.device_state()
        self._compiled, self._compiled_for = None, None

    def place(self, positions: np.ndarray) -> None:
        """The rows' positions [B] for the next step (each step advances them by one; a
        continuous batch whose rows change sets them every step)."""
        self._positions = jnp.asarray(positions, jnp.int32)

    def token(self, step: int, tok: jax.Array, valid: np.ndarray, kv: list, root):
        """One decode step for tok [B] (on the device); `valid` [B] marks rows still generating.
        kv is updated in place. Returns the next token on the device and on the host."""
        if self._valid_host is None or not np.array_equal(valid, self._valid_host):  # rows finish rarely
            self._valid_host, self._valid = valid.copy(), jnp.asarray(valid)
        args = self._args(tok, self._positions, self._valid, kv, self._state, root, self._step)
        shapes = (tok.shape, jax.tree.leaves(kv[0])[0].shape)  # a continuous batch changes its bucket
        if self._compiled_for != shapes:  # looked up per shape: a lookup per call costs a signature
            self._compiled, self._compiled_for = self._program(*args), shapes
        clock = self.engine.executor.clock
        with clock.phase("dispatch"):
            out = self._compiled(self.engine.model_piece.leaves, *args)
        clock.device("compute", out.token)
        kv[:] = out.kv
        self._state, self._positions, self._step = out.state, out.positions, out.step
        self.engine.cache.pool = out.state.pool  # the donated pool's successor
        if self.counts_each_step:  # in flight with the token's copy: `counts` then waits for nothing more
            out.state.counts.copy_to_host_async()
        with clock.phase("host_read"):  # the one host read of a token
            tok_host = np.asarray(out.token)
        self.counters.runs += 1
        self.counters.tokens += 1
        return out.token, tok_host

    def counts(self) -> dict:
        """The device's counters since `start` (a small read; the program is waited for)."""
        return dict(zip(dc.COUNTERS, (int(c) for c in np.asarray(self._state.counts))))

    def finish(self) -> dict:
        """After the last step: the counters into the cache's, the slots back to its schedule;
        returns the prediction counts (the driver's keys)."""
        counts = self.counts()
        self.engine.cache.take_device_state(self._state, counts)
        self.skipped_experts = counts["skipped_experts"]
        return {"predictor_calls": counts["predictor_calls"], "map_calls": 0,
                "predictor_skipped_tokens": counts["predictor_skipped_tokens"], "boundary_copies": 0}  # fmt: skip
