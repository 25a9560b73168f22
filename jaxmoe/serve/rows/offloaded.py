"""The offloaded engine driven row by row.

Prefill: chunk by chunk through the routed prefill (engine/routed.py: only the experts its
tokens route to are loaded), which computes the resident engine's numbers. Decode: the
engine's own decoder, whose step program also takes each row's sampling: for the policies
the device runs, the one-program step that fetches its misses itself (engine/device_decode.py,
one host read per step); for the host-planned policy (maps), the step that
returns to the host per missed layer (engine/offloaded_decode.py). The device expert cache
is the engine's, shared by every row and kept across requests.

A device decode keeps the cache's state on the device from step to step; a prefill chunk
plans on the host, so before one runs the state comes back to the cache (`settle`: a read of
the slot owners and counters, once per chunk that follows a decode step).

Shapes: B rows, C chunk, S cache length, D hidden.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.device_decode import DeviceDecoder
from jaxmoe.engine.device_step import device_step_at
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.offloaded_decode import OffloadedDecoder, offloaded_step
from jaxmoe.engine.routed import routed_chunk
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.model.decoder import head_logits
from jaxmoe.model.window import mark_padding
from jaxmoe.offload.device_cache import DEVICE_POLICIES
from jaxmoe.serve.rows.base import RowPrefill, Rows
from jaxmoe.serve.rows.exact import per_token_moe
from jaxmoe.serve.rows.sampling import row_sampler, sample_rows


def first_token_rows(ends, x, index, sampling):
    """The next token from x [1, C, D] (the chunk holding the prompt's last token) at `index`."""
    h = ends.norm(x)[:, index]
    return sample_rows(head_logits(ends.embed_tokens, ends.lm_head, h), sampling)


def rows_step(model_at, *args, scorer, picks, fmt):
    """offloaded_step (engine/offloaded_decode.py) whose last argument is the rows' sampling,
    with experts and head computed per row (rows/exact.py): the same decode step and report."""
    *step_args, sampling = args
    return offloaded_step(model_at, *step_args, sampling=SamplingParams(), scorer=scorer, picks=picks, fmt=fmt,
                          moe_fn=per_token_moe, sampler=row_sampler(sampling))  # fmt: skip


def rows_device_step(model_at, *args, policy, fmt, scorer):
    """device_step (engine/device_step.py) whose last argument is the rows' sampling, with
    experts and head computed per row (rows/exact.py)."""
    *step_args, sampling = args
    return device_step_at(model_at, *step_args, sampling=SamplingParams(), policy=policy, fmt=fmt, scorer=scorer,
                          moe_fn=per_token_moe, sampler=row_sampler(sampling))  # fmt: skip


class RowSampling:
    """A decoder whose step program's last argument is the rows' sampling (set per step)."""

    sampling_rows: tuple = ()

    def static(self) -> dict:
        static = super().static()
        del static["sampling"]
        return static


class RowsDecoder(RowSampling, OffloadedDecoder):
    """OffloadedDecoder whose step program is `rows_step`: everything else (the cache's
    plans, loads, resumes, counters) is the engine's."""

    program_name, step_program = "serve_step", staticmethod(rows_step)

    def args(self, *step_args) -> tuple:
        return (*super().args(*step_args), self.sampling_rows)


class RowsDeviceDecoder(RowSampling, DeviceDecoder):
    """DeviceDecoder whose step program is `rows_device_step`."""

    program_name, step_program = "serve_device_step", staticmethod(rows_device_step)
    counts_each_step = True  # the batcher reports the cache's counters after every step (OffloadedRows.counters)

    def _args(self, *step_args) -> tuple:
        return (*super()._args(*step_args), self.sampling_rows)


class OffloadedPrefill(RowPrefill):
    def __init__(self, rows: "OffloadedRows", prompt: list[int], cache_len: int):
        super().__init__(rows, prompt, cache_len)
        self.kv = list(self.kv)  # routed_chunk updates it in place
        self.positions = np.arange(self.tokens.shape[1], dtype=np.int32)[None]
        self.valid = self.positions < self.prompt_len
        self.positions = mark_padding(self.positions, self.valid)  # padding writes no keys
        self.x_last = None

    def chunk(self, start: int, tokens: jax.Array) -> None:
        self.rows.settle()
        end = start + self.size
        x = routed_chunk(self.rows.engine, tokens, self.positions[:, start:end], self.valid[:, start:end], self.kv)
        if start <= self.prompt_len - 1 < end:
            self.x_last, self.index = x, self.prompt_len - 1 - start

    def first_token(self, sampling: tuple) -> tuple[int, tuple]:
        engine = self.rows.engine
        tok = engine.executor.run("serve_first", first_token_rows, {}, (), engine.ends, self.x_last,
                                  jnp.int32(self.index), sampling)  # fmt: skip
        return int(np.asarray(tok)[0]), tuple(self.kv)


class OffloadedRows(Rows):
    prefill_type = OffloadedPrefill

    def __init__(self, engine: OffloadedEngine, max_rows: int):
        super().__init__(engine)
        engine.ensure_cache(max_rows)  # sized for the largest batch, kept for every bucket
        engine.cache.begin()
        on_device = engine.policy_name in DEVICE_POLICIES
        self.decoder = (RowsDeviceDecoder if on_device else RowsDecoder)(engine, SamplingParams())
        self.live = False  # a device decoder holds the cache's state (since its first step after a prefill)
        self.root = jax.random.key(0)  # unused by the rows' sampler; the program takes one
        self.steps = 0  # the schedule's clock (a policy's recency)
        self.skipped_experts = 0  # the approximate decode's (row, k) not computed, settled so far

    def settle(self) -> None:
        """The cache's state back from a device decode, for host planning (a prefill chunk)."""
        if self.live:
            self.decoder.finish()
            self.skipped_experts += self.decoder.skipped_experts
            self.live = False

    def decode(self, kv, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray, sampling: tuple):
        decoder, kv = self.decoder, list(kv)
        if isinstance(decoder, DeviceDecoder) and self.live:
            decoder.place(positions)
        elif isinstance(decoder, DeviceDecoder):  # the first step since the cache's state came back
            decoder.start(positions, 1 << 30)
            self.live = True
        else:
            decoder.start(positions, 1 << 30)
            decoder.dispatch_ahead = False  # the next step's rows are not known until this one's tokens are read
        decoder.sampling_rows = sampling
        self.steps += 1
        _, tok_host = decoder.token(self.steps, jnp.asarray(tokens), valid, kv, self.root)
        # The executed plans are a per-generate record; a server would keep them forever.
        self.engine.cache.schedule.executed.clear()
        return np.asarray(tok_host), tuple(kv)

    def counters(self) -> dict:
        c, skipped = dataclasses.replace(self.engine.cache.counters), self.skipped_experts
        if self.live:  # what the device counted since its state left the cache
            counts = self.decoder.counts()
            self.engine.cache.count_device(c, counts)
            skipped += counts["skipped_experts"]
        return {"expert_hits": c.expert_hits, "expert_misses": c.expert_misses, "h2d_bytes": c.h2d_bytes,
                "skipped_experts": skipped}  # fmt: skip
