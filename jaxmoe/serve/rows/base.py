"""What the batcher asks of an engine: its programs driven a row at a time.

A request's prompt is prefilled alone (a batch of one), a chunk per `step()` so decode
steps run between its chunks, into a cache of the length an offline generate of that
request allocates; its first token and every decode step are the offline engine's. The
batcher sees only this interface; rows/resident.py and rows/offloaded.py fill it in.

Shapes: B rows, P prompt bucket, C chunk, S cache length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.runtime.buckets import cache_bucket, chunk_starts, prompt_bucket
from jaxmoe.engine.inputs import pad_right
from jaxmoe.model import init_kv_cache


class RowPrefill:
    """One prompt's prefill, a chunk per `step()`."""

    def __init__(self, rows: "Rows", prompt: list[int], cache_len: int):
        self.rows, self.prompt_len = rows, len(prompt)
        self.tokens = pad_right([prompt])[1]  # [1, P bucket]
        self.size, self.starts = chunk_starts(self.tokens.shape[1], rows.engine.prefill_chunk)
        self.kv = rows.new_kv(1, cache_len)
        self.next_chunk = 0

    @property
    def done(self) -> bool:
        return self.next_chunk == len(self.starts)

    @property
    def chunks_left(self) -> int:
        return len(self.starts) - self.next_chunk

    def step(self) -> None:
        start = self.starts[self.next_chunk]
        self.chunk(start, jnp.asarray(self.tokens[:, start : start + self.size]))
        self.next_chunk += 1

    def chunk(self, start: int, tokens: jax.Array) -> None:
        """Run the chunk tokens [1, C] at positions start.. into `self.kv`."""
        raise NotImplementedError

    def first_token(self, sampling: tuple) -> tuple[int, tuple]:
        """The request's first token (a host int) and its cache [1, S], once `done`."""
        raise NotImplementedError


class Rows:
    """An engine driven row by row. `prefill_type`: the RowPrefill this engine's prompts run."""

    prefill_type: type[RowPrefill] = RowPrefill

    def __init__(self, engine):
        self.engine, self.config, self.programs = engine, engine.config, engine.programs

    @property
    def prefill_chunk(self) -> int:
        """Tokens of one prefill chunk (`RowPrefill.step`)."""
        return self.engine.prefill_chunk

    def cache_length(self, prompt_tokens: int, max_tokens: int) -> int:
        """The cache an offline generate of this one request allocates."""
        return cache_bucket(prompt_bucket(prompt_tokens), max_tokens)

    def new_kv(self, rows: int, length: int):
        return init_kv_cache(self.config, rows, length)

    def prefill(self, prompt: list[int], cache_len: int) -> RowPrefill:
        return self.prefill_type(self, prompt, cache_len)

    def decode(self, kv, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray, sampling: tuple):
        """One step for every row (rows not `valid` compute on whatever they hold and are
        ignored): tokens [B], positions [B], `sampling` from rows/sampling.py's row_sampling;
        returns (tokens [B] on the host, the updated cache)."""
        raise NotImplementedError

    def counters(self) -> dict:
        """The expert cache's totals since the server started (none without one), and the
        (row, expert) pairs an approximate decode skipped."""
        return {"expert_hits": 0, "expert_misses": 0, "h2d_bytes": 0, "skipped_experts": 0}
