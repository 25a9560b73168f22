"""A request inside the server: what was asked, its objectives, and what it has produced.

The HTTP side creates it and reads its events; the batcher thread alone moves it
through queue -> prefill -> row -> done. Events cross threads through `emit`, which
the HTTP side binds to its event loop's queue.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Callable

from jaxmoe.serve.rows.sampling import RequestSampling
from jaxmoe.serve.text import TextTracker

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class SLO:
    """Objectives: time to first token and mean time per output token after it."""

    ttft_s: float
    tpot_s: float
    name: str = "default"  # the class attainment is counted under


@dataclasses.dataclass
class Chunk:
    text: str
    token_ids: list[int]


@dataclasses.dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    text: str  # whatever was held back until the end
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    status: int
    message: str


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: RequestSampling
    slo: SLO
    text: TextTracker
    emit: Callable[[object], None]  # thread-safe: hands an event to the waiting client
    eos_ids: frozenset = frozenset()
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    number: int = dataclasses.field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set by the HTTP side (client gone); the batcher frees the row
    # Filled in by the batcher.
    cache_len: int = 0  # its own KV length: what an offline generate of it allocates
    joined_at: float | None = None  # when it took a row
    tokens: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = dataclasses.field(default_factory=list)
    released: threading.Event = dataclasses.field(default_factory=threading.Event)  # the batcher let it go

    @property
    def deadline(self) -> float:
        """When its first token is due: the order it is admitted and prefilled in."""
        return self.arrival + self.slo.ttft_s

    @property
    def position(self) -> int:
        """The position of the last token, the next decode step's input."""
        return len(self.prompt) + len(self.tokens) - 1

    def add_token(self, token: int, now: float) -> str | None:
        """Record a token; returns the finish reason when the request is done, else None."""
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - self.last_token_at)
        self.last_token_at = now
        self.tokens.append(token)
        if token in self.eos_ids:  # in token_ids (as generate.py reports it), never in the text
            self.emit(Chunk("", [token]))
            return "stop"
        self.emit(Chunk(self.text.add(token), [token]))
        if self.text.stopped:
            return "stop"
        if len(self.tokens) >= self.max_tokens:
            return "length"
        return None

    def finish(self, reason: str | None) -> None:
        """It left the batcher: done (`reason`) or cancelled (None: nobody is listening)."""
        if reason is not None:
            self.emit(Done(reason, self.text.flush(), len(self.prompt), len(self.tokens)))
        self.released.set()

    def fail(self, status: int, message: str) -> None:
        self.emit(Failed(status, message))
        self.released.set()

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        return sum(self.token_gaps) / len(self.token_gaps) if self.token_gaps else None

    def met_slo(self) -> bool:
        return (self.ttft is not None and self.ttft <= self.slo.ttft_s
                and (self.tpot is None or self.tpot <= self.slo.tpot_s))  # fmt: skip
