"""Teacher-forced scoring through the offloaded engine's own decode: perplexity as the
offloaded decode computes it, approximate decode (`skip_below`) included.

Each window is a request: its context goes through the engine's prefill (exact: a prefill
loads every routed expert), then every scored position is one run of the device decode step
program (engine/device_step.py), fed the text's token instead of a sampled one and returning
log-probabilities instead of a token. So the cache, its policy, the in-program fetches and the
skipping rule are the decode's own, token by token; the cache stays warm from window to
window, as it does from request to request. Batch 1.

Shapes: T window length (targets), C context tokens, V vocabulary.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.engine.device_decode import DeviceDecoder
from jaxmoe.engine.inputs import pad_prompts
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.model import init_kv_cache
from jaxmoe.model.decoder import head_logits
from jaxmoe.offload.device_cache import DEVICE_POLICIES


def log_probs(model, h: jax.Array) -> jax.Array:
    """The step's `sampler`: [B, D] -> [B, V] fp32 log-probabilities of the next token."""
    return jax.nn.log_softmax(head_logits(model.embed_tokens, model.lm_head, h).astype(jnp.float32), axis=-1)


class ForcedDecoder(DeviceDecoder):
    """The device decode whose step returns log-probabilities; its caller feeds the tokens."""

    program_name = "device_step_forced"

    def static(self) -> dict:
        return {**super().static(), "sampler": log_probs}


def forced_nll(engine, windows: np.ndarray, scored: int) -> dict:
    """Summed NLL (nats) of each window's last `scored` targets (windows [W, T+1]: inputs
    [:T], targets [1:]), the context [:T - scored] prefilled and each scored position decoded.
    Returns {"nll", "tokens", "decode_seconds", "decode_h2d_bytes", "prefill_h2d_bytes",
    "decode_misses", "skipped_experts"}."""
    if engine.policy_name not in DEVICE_POLICIES:
        raise ValueError(f"teacher-forced decode needs a policy the device runs, not {engine.policy_name!r}")
    cfg = engine.config
    context = windows.shape[1] - 1 - scored
    if context < 1:
        raise ValueError(f"windows of {windows.shape[1] - 1} inputs leave no context before {scored} scored targets")
    totals = dict.fromkeys(("nll", "decode_seconds", "decode_h2d_bytes", "prefill_h2d_bytes", "decode_misses",
                            "skipped_experts"), 0)  # fmt: skip
    root, valid = jax.random.key(0), np.ones((1,), bool)
    engine.ensure_cache(1)
    for window in np.asarray(windows, np.int32):
        lengths, tokens, cache_len = pad_prompts(cfg, [window[:context].tolist()], scored + 1)
        cache = engine.cache
        cache.begin()
        kv = list(init_kv_cache(cfg, 1, cache_len))
        before = cache.counters.h2d_bytes
        engine.prefill(tokens, lengths, kv)
        prefilled, misses = cache.counters.h2d_bytes, cache.counters.expert_misses
        decoder = ForcedDecoder(engine, SamplingParams())
        decoder.start(lengths, scored + 1)
        logp = []
        start, compiled = time.perf_counter(), engine.programs.compile_seconds
        for i in range(scored):
            _, row = decoder.token(i + 1, jnp.asarray(window[context + i : context + i + 1]), valid, kv, root)
            logp.append(row[0, window[context + i + 1]])
        totals["decode_seconds"] += time.perf_counter() - start - (engine.programs.compile_seconds - compiled)
        decoder.finish()
        totals["nll"] -= float(np.sum(logp, dtype=np.float64))
        totals["prefill_h2d_bytes"] += prefilled - before
        totals["decode_h2d_bytes"] += cache.counters.h2d_bytes - prefilled
        totals["decode_misses"] += cache.counters.expert_misses - misses
        totals["skipped_experts"] += decoder.skipped_experts
    return {**totals, "tokens": len(windows) * scored}
