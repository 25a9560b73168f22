"""Resident generation: every weight on the device, a static KV cache, jitted
prefill-chunk, first-token and decode programs per shape bucket, compiled ahead of time.

A prompt longer than the prefill chunk runs through the whole model one chunk at a
time (each chunk attends to the cache the earlier ones filled), so activation and
attention memory are bounded by the chunk. The offloaded engine computes exactly
the same chunks, which is what keeps the two engines' numbers identical.

Shapes: B batch, P prompt bucket, C chunk, S cache bucket, D hidden, V vocab.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.engine.executor import Piece, pack_module
from jaxmoe.runtime.buckets import DEFAULT_PREFILL_CHUNK, check_chunk, chunk_starts
from jaxmoe.runtime.metrics import tree_bytes
from jaxmoe.engine.inputs import prepare
from jaxmoe.engine.outputs import GenerationResult, TokenCollector, generate_metrics
from jaxmoe.runtime.programs import Programs
from jaxmoe.engine.sampling import SamplingParams, sample
from jaxmoe.engine.step import forward_step
from jaxmoe.model import ExpertWeights, MoEDecoder, check_model_dtype, moe_ffn
from jaxmoe.model.window import mark_padding
from jaxmoe.quant import format_of


def pick_last(h: jax.Array, start, lengths: jax.Array, last: jax.Array) -> jax.Array:
    """h [B, C, D] of the chunk at `start`: rows whose last prompt token is in this chunk
    take its hidden state, the others keep `last` [B, D]."""
    index = lengths - 1 - start
    here = (index >= 0) & (index < h.shape[1])
    return jnp.where(here[:, None], h[jnp.arange(h.shape[0]), jnp.clip(index, 0, h.shape[1] - 1)], last)


class ResidentEngine:
    skip_below = 0.0  # every expert is on the device: nothing is missed, nothing skipped (exact)

    def __init__(
        self,
        config: MoEConfig,
        model: MoEDecoder,
        experts: Sequence[ExpertWeights | None],
        moe_fn: Callable = moe_ffn,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        own_model: bool = False,
    ):
        """`own_model`: the engine owns `model`, whose arrays are freed once packed (the caller
        must not use it afterwards); otherwise the packed weights are a second copy."""
        check_model_dtype(config, model)
        self.config = config
        self.prefill_chunk = check_chunk(prefill_chunk)
        # The weights go in as the pack's few buffers (engine/weights.py): flattening the
        # module's state on every call costs more host time than a decode step computes on a
        # small model, and a GPU call costs host time per argument.
        self.piece = Piece(model, pack_module(model, consume=own_model))
        self.state = self.piece.leaves
        self.experts = tuple(experts)
        self.moe_fn = moe_fn
        self.programs = Programs()

    # -- jitted math ------------------------------------------------------------
    # Step counters and positions stay on the device and come back incremented, so
    # the host loop feeds outputs straight back in without building arrays per token.
    def _prefill_chunk(self, state, experts, tokens, start, lengths, last, kv):
        """One chunk tokens [B, C] at positions start.., through every layer; `last` [B, D]
        picks up the final-norm hidden state of each prompt's last token if it is here."""
        model = self.piece.merge(state)
        b, c = tokens.shape
        positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        positions = mark_padding(positions, positions < lengths[:, None])  # padding writes no keys
        h, kv, _ = model(tokens, positions, kv, experts, self.moe_fn)
        return pick_last(h, start, lengths, last), kv

    def prefill_program(self, *args):
        """The compiled prefill-chunk program for the shapes of `args` (state, experts,
        tokens [B, C], start, lengths [B], last [B, D], kv); it donates `last` and `kv`."""
        return self.programs.get("prefill_chunk", self._prefill_chunk, {}, (5, 6), *args)

    def _first_token(self, state, last, lengths, root, sampling):
        model = self.piece.merge(state)
        tok = sample(model.logits(last), jax.random.fold_in(root, 0), sampling)
        return tok, lengths, jnp.ones((), jnp.int32)

    def _decode(self, state, experts, tokens, positions, step, kv, root, sampling):
        """Every layer straight through (engine/step.py): the calls the offloaded steps make
        per layer, on the same shapes, so the same numbers."""
        token, kv = forward_step(self.piece.merge(state), tokens[:, None], positions[:, None], kv, experts, root, step,
                                 sampling=sampling, moe_fn=self.moe_fn,
                                 merge=functools.partial(self.piece.merge, state))  # fmt: skip
        return token, positions + 1, step + 1, kv

    # -- host loop --------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        eos_ids: Sequence[int] = (),
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` per prompt; a row stops at its first EOS."""
        inputs = prepare(self.config, prompts, max_new_tokens, seed)
        lengths, tokens, kv, root = inputs.lengths, inputs.tokens, inputs.kv, inputs.root
        b, p_len = tokens.shape
        kv_bytes = tree_bytes(kv)
        lengths_dev = jnp.asarray(lengths)
        last = jnp.zeros((b, self.config.hidden_size), self.config.dtype)
        size, starts = chunk_starts(p_len, self.prefill_chunk)
        chunk_args = (self.state, self.experts, jnp.asarray(tokens[:, :size]), jnp.int32(0), lengths_dev, last, kv)
        prefill = self.prefill_program(*chunk_args)
        first_args = (self.state, last, lengths_dev, root)
        first = self.programs.get("first_token", self._first_token, {"sampling": sampling}, (), *first_args)
        start = time.perf_counter()
        for s in starts:
            last, kv = prefill(self.state, self.experts, jnp.asarray(tokens[:, s : s + size]), jnp.int32(s),
                               lengths_dev, last, kv)  # fmt: skip
        tok, positions, step_dev = first(self.state, last, lengths_dev, root)
        out = TokenCollector(b, eos_ids, on_token)
        out.add(np.asarray(tok))  # the first token is what TTFT measures
        ttft = time.perf_counter() - start

        args = (self.state, self.experts, tok, positions, step_dev, kv, root)
        decode = self.programs.get("decode", self._decode, {"sampling": sampling}, ("kv",), *args)
        decode_start, steps = time.perf_counter(), 0
        for _ in range(1, max_new_tokens):
            if out.all_done:
                break
            tok, positions, step_dev, kv = decode(self.state, self.experts, tok, positions, step_dev, kv, root)
            out.add(np.asarray(tok))  # one host read per token: EOS and streaming need it
            steps += 1
        decode_seconds = time.perf_counter() - decode_start

        fmt = format_of(self.experts)
        metrics = {
            **generate_metrics(out, ttft, decode_seconds, steps, self.programs, b, p_len,
                               tree_bytes((self.state, self.experts)) + kv_bytes, fmt, fmt.nbytes(self.config)),
            "prefill_chunks": len(starts),
            "host_syncs_per_token": 1.0 if steps else None,  # the token, read once per step
            "resumes_per_token": 0.0 if steps else None,
        }  # fmt: skip
        return GenerationResult(out.token_ids, metrics)
