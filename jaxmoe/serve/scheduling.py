"""The order the batcher admits queued requests into free rows and prefills them in.

  fcfs   arrival order
  edf    earliest TTFT deadline first (the server's rule until 2026-12-07, and its default)
  task   task-aware (eMoE's idea): each request's cost decides whether it can still meet its
         TTFT. A prompt is prefilled one chunk per turn of the engine thread, so its first
         token comes no sooner than its chunks times the measured time of a turn that runs a
         chunk (offloaded, that time includes loading the experts the chunk routes to). The
         requests that can still make their deadline that way go first, by deadline; those
         that cannot go after all of them, oldest first, so every class is still served.
         EDF spends rows and chunks on requests that will be late anyway once the queue backs
         up, and every request behind them is late too (docs/BENCHMARKS.md, "Serving: the
         admission rule": where EDF missed 31% of the objectives, this rule missed 0.43x as
         many; below that load it did not help). Rules that also weighed each request's
         expected output length (how long it holds a row) did no better and are not offered.

The turn time is learned while serving (`Costs`): an exponential mean of the wall time of a
turn that ran a prefill chunk (the chunk, and the decode step or first token that waits for it).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxmoe.runtime.buckets import chunk_starts, prompt_bucket
from jaxmoe.serve.request import Request

RULES = ("edf", "fcfs", "task")


@dataclasses.dataclass
class Costs:
    chunk_tokens: int  # tokens of one prefill chunk
    turn_s: float = 0.0  # a turn that runs a chunk (0: none measured yet)
    decay: float = 0.2

    def turn_ran(self, seconds: float) -> None:
        self.turn_s = seconds if self.turn_s == 0.0 else (1 - self.decay) * self.turn_s + self.decay * seconds

    def prefill_s(self, request: Request, chunks_left: int | None = None) -> float:
        """Its prefill (its last `chunks_left` chunks) from now: a turn per chunk, the prompt's
        bucket split as RowPrefill splits it."""
        if chunks_left is None:
            chunks_left = len(chunk_starts(prompt_bucket(len(request.prompt)), self.chunk_tokens)[1])
        return chunks_left * self.turn_s


def order(rule: str, requests: Sequence[Request], now: float, costs: Costs,
          chunks_left: Mapping[int, int] | None = None) -> list[Request]:  # fmt: skip
    """`requests` in the order `rule` serves them (the first goes first). `chunks_left`:
    request number -> chunks still to prefill, for prompts whose prefill has begun."""
    if rule == "fcfs":
        return sorted(requests, key=lambda r: (r.arrival, r.number))
    by_deadline = sorted(requests, key=lambda r: (r.deadline, r.number))
    if rule == "edf":
        return by_deadline
    left = chunks_left or {}
    can = [r for r in by_deadline if now + costs.prefill_s(r, left.get(r.number)) <= r.deadline]
    late = [r for r in by_deadline if r not in can]
    return can + sorted(late, key=lambda r: (r.arrival, r.number))


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"schedule {rule!r}: expected one of {', '.join(RULES)}")
    return rule
