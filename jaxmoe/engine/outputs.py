"""What both engines' generate returns: tokens collected per row, the timing metrics, the result."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxmoe.runtime.metrics import device_peak_bytes


class TokenCollector:
    """Generated tokens per row; a row stops collecting after its first EOS."""

    def __init__(self, batch: int, eos_ids: Sequence[int], on_token: Callable[[int], None] | None):
        self.token_ids: list[list[int]] = [[] for _ in range(batch)]
        self.done = np.zeros(batch, bool)
        self._eos = set(int(e) for e in eos_ids)
        self._on_token = on_token

    def add(self, tokens: np.ndarray) -> None:
        """One step's sampled tokens [B] (host array)."""
        for row in np.flatnonzero(~self.done):
            self.token_ids[row].append(int(tokens[row]))
            self.done[row] = int(tokens[row]) in self._eos
        if self._on_token:
            self._on_token(1)

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


def timing_metrics(out: TokenCollector, ttft_s: float, decode_s: float, steps: int) -> dict:
    """ttft, tpot and decode rate; the decode figures count the tokens after each row's first."""
    decoded = sum(len(t) - 1 for t in out.token_ids)
    return {
        "ttft_ms": 1e3 * ttft_s,
        "tpot_ms": 1e3 * decode_s / steps if steps else None,
        "decode_tokens_per_s": decoded / decode_s if steps else None,
    }


def generate_metrics(out: TokenCollector, ttft_s: float, decode_s: float, steps: int, programs, batch: int,
                     prompt_bucket: int, counted_peak_bytes: int, fmt, expert_bytes: int) -> dict:  # fmt: skip
    """The metrics both engines report: timing, the peak device bytes (the device's own figure
    where it keeps one, else `counted_peak_bytes`, the engine's count), compile time and disk
    cache hits of `programs`, the batch, the prompt bucket and the expert format."""
    return {
        **timing_metrics(out, ttft_s, decode_s, steps),
        "peak_device_bytes": device_peak_bytes() or counted_peak_bytes,
        "compile_ms": 1e3 * programs.compile_seconds,
        "compile_cache_hits": programs.cache_hits,
        "batch": batch,
        "prompt_bucket": prompt_bucket,
        "expert_format": fmt.name,
        "expert_bytes": expert_bytes,
    }


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated tokens per prompt, without the prompt, EOS included
    metrics: dict
