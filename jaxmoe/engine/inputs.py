"""What both engines' generate takes: prompts checked against the model and padded into a
bucket, an empty KV cache and the sampling key (`prepare`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.runtime.buckets import cache_bucket, prompt_bucket
from jaxmoe.model import init_kv_cache


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
    lengths, tokens = pad_right(prompts)
    return lengths, tokens, cache_bucket(tokens.shape[1], max_new_tokens)


def pad_right(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [B], tokens [B, P]): the prompts right-padded with 0 to the bucket P of the longest."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), prompt_bucket(int(lengths.max()))), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return lengths, tokens


@dataclasses.dataclass(frozen=True)
class Prepared:
    lengths: np.ndarray  # [B] int32 prompt lengths
    tokens: np.ndarray  # [B, P] int32, right-padded to the prompt bucket P
    kv: tuple  # every layer's empty KV cache for the bucket of prompt plus new tokens
    root: jax.Array  # the sampling key

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompt_bucket(self) -> int:
        return self.tokens.shape[1]


def prepare(config: MoEConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> Prepared:
    """A generate's inputs (`pad_prompts`), refused before any work when they do not fit."""
    lengths, tokens, cache_len = pad_prompts(config, prompts, max_new_tokens)
    return Prepared(lengths, tokens, init_kv_cache(config, len(prompts), cache_len), jax.random.key(seed))
