"""What both engines' generate returns: tokens collected per row, the timing metrics, the result."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


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


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated tokens per prompt, without the prompt, EOS included
    metrics: dict
