"""Resident generation: every weight on the device, a static KV cache, one jitted
prefill and one jitted decode step per shape bucket, compiled ahead of time.

Shapes: B batch, P prompt bucket, S cache bucket, V vocab.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.engine.buckets import cache_bucket, prompt_bucket
from jaxmoe.engine.metrics import device_peak_bytes, tree_bytes
from jaxmoe.engine.outputs import TokenCollector, timing_metrics
from jaxmoe.engine.programs import Programs
from jaxmoe.engine.sampling import SamplingParams, sample
from jaxmoe.model import ExpertWeights, MoEDecoder, init_kv_cache, moe_ffn


class ContextError(ValueError):
    """Prompt plus new tokens do not fit the model's context."""


def check_fits(config: MoEConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse, before any work, prompts that are empty, out of vocabulary or past the context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    longest = max(len(p) for p in prompts)
    context = config.max_position_embeddings
    if longest + max_new_tokens > context:
        raise ContextError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the model's context of {context} tokens (max_position_embeddings)"
        )


def pad_prompts(config: MoEConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Checked, right-padded prompts: (lengths [B], tokens [B, P bucket], KV cache length)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_fits(config, prompts, max_new_tokens)
    lengths = np.array([len(p) for p in prompts], np.int32)
    p_len = prompt_bucket(int(lengths.max()))
    tokens = np.zeros((len(prompts), p_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return lengths, tokens, cache_bucket(p_len, max_new_tokens)


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated tokens per prompt, without the prompt, EOS included
    metrics: dict


class ResidentEngine:
    def __init__(
        self,
        config: MoEConfig,
        model: MoEDecoder,
        experts: Sequence[ExpertWeights | None],
        moe_fn: Callable = moe_ffn,
    ):
        self.config = config
        self.graphdef, self.state = nnx.split(model)
        self.experts = tuple(experts)
        self.moe_fn = moe_fn
        self.programs = Programs()

    # -- jitted math ------------------------------------------------------------
    # Step counters and positions stay on the device and come back incremented, so
    # the host loop feeds outputs straight back in without building arrays per token.
    def _prefill(self, state, experts, tokens, lengths, kv, root, sampling):
        model = nnx.merge(self.graphdef, state)
        b, p = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        h, kv, _ = model(tokens, positions, kv, experts, self.moe_fn)
        last = h[jnp.arange(b), lengths - 1]  # [B, D] hidden state of each prompt's last token
        tok = sample(model.logits(last), jax.random.fold_in(root, 0), sampling)
        return tok, lengths, jnp.ones((), jnp.int32), kv

    def _decode(self, state, experts, tokens, positions, step, kv, root, sampling):
        model = nnx.merge(self.graphdef, state)
        h, kv, _ = model(tokens[:, None], positions[:, None], kv, experts, self.moe_fn)
        tok = sample(model.logits(h[:, 0]), jax.random.fold_in(root, step), sampling)
        return tok, positions + 1, step + 1, kv

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
        lengths, tokens, cache_len = pad_prompts(self.config, prompts, max_new_tokens)
        b, p_len = tokens.shape
        kv = init_kv_cache(self.config, b, cache_len)
        kv_bytes = tree_bytes(kv)
        root = jax.random.key(seed)

        args = (self.state, self.experts, jnp.asarray(tokens), jnp.asarray(lengths), kv, root)
        prefill = self.programs.get("prefill", self._prefill, {"sampling": sampling}, ("kv",), *args)
        start = time.perf_counter()
        tok, positions, step_dev, kv = prefill(*args)
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

        metrics = {
            **timing_metrics(out, ttft, decode_seconds, steps),
            "peak_device_bytes": device_peak_bytes() or tree_bytes((self.state, self.experts)) + kv_bytes,
            "compile_ms": 1e3 * self.programs.compile_seconds,
            "batch": b,
            "prompt_bucket": p_len,
        }
        return GenerationResult(out.token_ids, metrics)
