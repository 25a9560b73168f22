"""The resident engine's programs driven row by row for the continuous batch.

A request's prompt is prefilled alone (batch of one) with the engine's own chunk program
and chunk size, into a cache of the length an offline generate of that request would
use, so its prefill and first token are the offline engine's. The decode step is the
engine's step (engine/step.py) with per-row positions and per-row sampling.

Shapes: B rows, P prompt bucket, C chunk, S cache length, D hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.buckets import cache_bucket, chunk_starts, prompt_bucket
from jaxmoe.engine.resident import ResidentEngine
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.engine.step import decode_step
from jaxmoe.model import init_kv_cache
from jaxmoe.serve.row_exact import per_token_moe
from jaxmoe.serve.row_sampling import row_sampler, sample_rows


def row_cache_length(prompt_tokens: int, max_tokens: int) -> int:
    """The cache an offline generate of this one request allocates."""
    return cache_bucket(prompt_bucket(prompt_tokens), max_tokens)


def padded_prompt(prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """tokens [1, P bucket] right-padded, lengths [1]."""
    tokens = np.zeros((1, prompt_bucket(len(prompt))), np.int32)
    tokens[0, : len(prompt)] = prompt
    return tokens, np.array([len(prompt)], np.int32)


class ResidentPrefill:
    """One prompt's prefill, a chunk per `step()`, so decode steps run in between."""

    def __init__(self, rows: "ResidentRows", prompt: list[int], cache_len: int):
        self.rows = rows
        cfg, engine = rows.config, rows.engine
        self.tokens, lengths = padded_prompt(prompt)
        self.lengths = jnp.asarray(lengths)
        self.size, self.starts = chunk_starts(self.tokens.shape[1], engine.prefill_chunk)
        self.kv = init_kv_cache(cfg, 1, cache_len)
        self.last = jnp.zeros((1, cfg.hidden_size), cfg.dtype)
        self.next_chunk = 0

    @property
    def done(self) -> bool:
        return self.next_chunk == len(self.starts)

    def step(self) -> None:
        engine, s = self.rows.engine, self.starts[self.next_chunk]
        args = (engine.state, engine.experts, jnp.asarray(self.tokens[:, s : s + self.size]), jnp.int32(s),
                self.lengths, self.last, self.kv)  # fmt: skip
        program = engine.programs.get("prefill_chunk", engine._prefill_chunk, {}, (5, 6), *args)
        self.last, self.kv = program(*args)
        self.next_chunk += 1

    def first_token(self, sampling: tuple) -> tuple[int, tuple]:
        """The request's first token (host int) and its cache [1, S]."""
        engine = self.rows.engine
        program = engine.programs.get("serve_first", self.rows._first, {}, (), engine.state, self.last, sampling)
        return int(np.asarray(program(engine.state, self.last, sampling))[0]), self.kv


class ResidentRows:
    def __init__(self, engine: ResidentEngine, exact: bool = True):
        """`exact`: each row's decode step is the one-row step program, run row after row
        inside one program, so a row's numbers are those of the row alone whatever the batch
        (XLA's batched kernels round some rows differently from 8 rows on: see row_exact.py);
        False: one batched step (more parallel on a GPU; a near tie can flip a greedy token)."""
        self.engine, self.config, self.exact = engine, engine.config, exact
        self.programs = engine.programs

    def new_kv(self, rows: int, length: int):
        return init_kv_cache(self.config, rows, length)

    def prefill(self, prompt: list[int], cache_len: int) -> ResidentPrefill:
        return ResidentPrefill(self, prompt, cache_len)

    def _first(self, state, last, sampling):
        return sample_rows(self.engine.piece.merge(state).logits(last), sampling)

    def _decode(self, state, experts, tokens, positions, kv, sampling):
        """The engine's decode step with each row at its own position and its own sampler, its
        experts and head computed as a one-row step computes them (serve/row_exact.py)."""
        model = self.engine.piece.merge(state)
        b = tokens.shape[0]
        x_start = jnp.zeros((b, 1, self.config.hidden_size), self.config.dtype)
        out = decode_step(model, tokens[:, None], positions[:, None], jnp.ones((b,), bool), kv, experts, None,
                          jnp.int32(0), x_start, jax.random.key(0), jnp.int32(0), sampling=SamplingParams(),
                          moe_fn=per_token_moe, sampler=row_sampler(sampling))  # fmt: skip
        return out.token, out.kv

    def _decode_exact(self, state, experts, tokens, positions, kv, sampling):
        """Row after row, each the engine's one-row decode step on its slice of the cache,
        written back in place."""
        model = self.engine.piece.merge(state)
        x_start = jnp.zeros((1, 1, self.config.hidden_size), self.config.dtype)
        one = lambda a, r: jax.lax.dynamic_slice_in_dim(a, r, 1)  # noqa: E731

        def row(r, carry):
            out_tokens, kv = carry
            kv_row = jax.tree.map(lambda a: one(a, r), kv)
            out = decode_step(model, one(tokens, r)[:, None], one(positions, r)[:, None], jnp.ones((1,), bool), kv_row,
                              experts, None, jnp.int32(0), x_start, jax.random.key(0), jnp.int32(0),
                              sampling=SamplingParams(), moe_fn=self.engine.moe_fn,
                              sampler=row_sampler(tuple(one(a, r) for a in sampling)))  # fmt: skip
            kv = jax.tree.map(lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, r, 0), kv, tuple(out.kv))
            return jax.lax.dynamic_update_slice_in_dim(out_tokens, out.token, r, 0), kv

        return jax.lax.fori_loop(0, tokens.shape[0], row, (jnp.zeros_like(tokens), kv))

    def decode(self, kv, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray, sampling: tuple):
        """One step for every row (rows not `valid` compute on whatever they hold and are
        ignored); returns (tokens [B] on the host, the updated cache)."""
        engine = self.engine
        args = (engine.state, engine.experts, jnp.asarray(tokens), jnp.asarray(positions), kv, sampling)
        if self.exact:
            program = self.programs.get("serve_decode_exact", self._decode_exact, {}, (4,), *args)
        else:
            program = self.programs.get("serve_decode", self._decode, {}, (4,), *args)
        tok, kv = program(*args)
        return np.asarray(tok), kv

    def counters(self) -> dict:
        return {"expert_hits": 0, "expert_misses": 0, "h2d_bytes": 0}
