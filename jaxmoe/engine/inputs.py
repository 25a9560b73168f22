"""What both engines' generate takes: prompts checked against the model and padded into a bucket."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.engine.buckets import cache_bucket, prompt_bucket


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
