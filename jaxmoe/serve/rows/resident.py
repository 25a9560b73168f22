"""The resident engine driven row by row: a prompt's chunks run the engine's own prefill
chunk program (its chunk size, a batch of one); the decode step is the engine's step
(engine/step.py) with per-row positions and per-row sampling.

Shapes: B rows, C chunk, S cache length, D hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.resident import ResidentEngine
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.engine.step import forward_step
from jaxmoe.model.kv import ROW_AXIS
from jaxmoe.serve.rows.base import RowPrefill, Rows
from jaxmoe.serve.rows.exact import per_token_moe
from jaxmoe.serve.rows.sampling import row_sampler, sample_rows


class ResidentPrefill(RowPrefill):
    def __init__(self, rows: "ResidentRows", prompt: list[int], cache_len: int):
        super().__init__(rows, prompt, cache_len)
        cfg = rows.config
        self.lengths = jnp.array([self.prompt_len], jnp.int32)
        self.last = jnp.zeros((1, cfg.hidden_size), cfg.dtype)

    def chunk(self, start: int, tokens: jax.Array) -> None:
        engine = self.rows.engine
        args = (engine.state, engine.experts, tokens, jnp.int32(start), self.lengths, self.last, self.kv)
        self.last, self.kv = engine.prefill_program(*args)(*args)

    def first_token(self, sampling: tuple) -> tuple[int, tuple]:
        engine = self.rows.engine
        program = engine.programs.get("serve_first", self.rows._first, {}, (), engine.state, self.last, sampling)
        return int(np.asarray(program(engine.state, self.last, sampling))[0]), self.kv


class ResidentRows(Rows):
    prefill_type = ResidentPrefill

    def __init__(self, engine: ResidentEngine, exact: bool = True):
        """`exact`: each row's decode step is the one-row step program, run row after row
        inside one program, so a row's numbers are those of the row alone whatever the batch
        (XLA's batched kernels round some rows differently from 8 rows on: see rows/exact.py);
        False: one batched step (more parallel on a GPU; a near tie can flip a greedy token)."""
        super().__init__(engine)
        self.exact = exact

    def _first(self, state, last, sampling):
        return sample_rows(self.engine.piece.merge(state).logits(last), sampling)

    def _decode(self, state, experts, tokens, positions, kv, sampling):
        """The engine's decode step with each row at its own position and its own sampler, its
        experts and head computed as a one-row step computes them (rows/exact.py)."""
        piece = self.engine.piece
        return forward_step(piece.merge(state), tokens[:, None], positions[:, None], kv, experts, jax.random.key(0),
                            jnp.int32(0), sampling=SamplingParams(), moe_fn=per_token_moe,
                            sampler=row_sampler(sampling), merge=functools.partial(piece.merge, state))  # fmt: skip

    def _decode_exact(self, state, experts, tokens, positions, kv, sampling):
        """Row after row, each the engine's one-row decode step on its slice of the cache,
        written back in place."""
        model = self.engine.piece.merge(state)
        one = lambda a, r: jax.lax.dynamic_slice_in_dim(a, r, 1)  # noqa: E731

        def row(r, carry):
            out_tokens, kv = carry
            kv_row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, r, 1, ROW_AXIS), kv)
            token, kv_row = forward_step(model, one(tokens, r)[:, None], one(positions, r)[:, None], kv_row, experts,
                                         jax.random.key(0), jnp.int32(0), sampling=SamplingParams(),
                                         moe_fn=self.engine.moe_fn,
                                         sampler=row_sampler(tuple(one(a, r) for a in sampling)),
                                         merge=functools.partial(self.engine.piece.merge, state))  # fmt: skip
            kv = jax.tree.map(lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, r, ROW_AXIS), kv, kv_row)
            return jax.lax.dynamic_update_slice_in_dim(out_tokens, token, r, 0), kv

        return jax.lax.fori_loop(0, tokens.shape[0], row, (jnp.zeros_like(tokens), kv))

    def decode(self, kv, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray, sampling: tuple):
        engine = self.engine
        args = (engine.state, engine.experts, jnp.asarray(tokens), jnp.asarray(positions), kv, sampling)
        if self.exact:
            program = self.programs.get("serve_decode_exact", self._decode_exact, {}, (4,), *args)
        else:
            program = self.programs.get("serve_decode", self._decode, {}, (4,), *args)
        tok, kv = program(*args)
        return np.asarray(tok), kv
