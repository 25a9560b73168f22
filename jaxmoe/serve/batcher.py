"""The continuous batcher: one thread that owns the engine and moves requests through
queue -> prefill -> a row of the batch -> done, one step at a time.

Each loop: drop what was cancelled (a client gone frees its row before the next step),
admit queued requests into free rows in the schedule's order (serve/scheduling.py: earliest
TTFT deadline first, arrival order, or task-aware), run one prefill chunk of the first
admitted prompt in that order, then one decode step for every row. A long prompt thus
advances one chunk per decode step instead of stalling the running rows for its whole
prefill (phase separation at chunk grain).
Requests join and leave only between steps; the batch cache moves between a few static
(rows, length) buckets, so no arrival compiles a new program once its bucket was seen.

`static=True` is the baseline the benchmark compares against: a new batch is admitted
only when the previous one has completely finished.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from jaxmoe.serve.batch_kv import BatchKV
from jaxmoe.serve.request import Request
from jaxmoe.serve.rows.base import Rows
from jaxmoe.serve.rows.sampling import row_sampling
from jaxmoe.serve.scheduling import Costs, check_rule, order


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The server is shutting down and takes no new requests."""


class Batcher:
    def __init__(self, rows: Rows, max_batch: int, max_queue: int, metrics=None, static: bool = False,
                 schedule: str = "edf"):  # fmt: skip
        self.rows, self.max_batch, self.max_queue = rows, max_batch, max_queue
        self.metrics, self.static, self.schedule = metrics, static, check_rule(schedule)
        self.costs = Costs(rows.prefill_chunk)
        self.batch = BatchKV(rows.programs, max_batch)
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._queue: list[Request] = []  # ordered when a row frees: who can still make it changes with time
        self._prefilling: list[tuple[Request, object]] = []
        self._accepting, self._running = True, False
        self._thread: threading.Thread | None = None
        self._service_s = 1.0  # running mean of a request's time in a row (Retry-After)
        self.steps = 0  # decode steps run
        self.interleaved_chunks = 0  # prefill chunks run while rows were decoding

    # -- the HTTP side ----------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._lock:
            if not self._accepting:
                raise Closed("the server is shutting down")
            waiting = len(self._inbox) + len(self._queue)
            if waiting >= self.max_queue:
                raise QueueFull(self.retry_after(waiting))
            self._inbox.append(request)
            self._lock.notify()

    def retry_after(self, waiting: int) -> int:
        """Seconds until about `waiting` requests ahead have gone through the rows."""
        return max(1, math.ceil(self._service_s * (waiting / self.max_batch + 1)))

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self._queue)

    @property
    def running(self) -> int:
        return len(self.batch.live())

    @property
    def busy(self) -> int:
        """Requests anywhere in the server: queued, prefilling or in a row."""
        return self.queue_depth + len(self._prefilling) + self.running

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="jaxmoe-batcher", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Take nothing new, let what runs finish for up to `grace_s`, cancel the rest."""
        with self._lock:
            self._accepting = False
            self._lock.notify()
        end = time.monotonic() + grace_s
        while self.busy and time.monotonic() < end:
            time.sleep(0.02)
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread:
            self._thread.join(timeout=30)
        for request in self._everyone():
            request.fail(503, "the server shut down before this request finished")

    def _everyone(self) -> list[Request]:
        return self._inbox + self._queue + [r for r, _ in self._prefilling] + self.batch.requests()

    # -- the engine thread ------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._inbox and not self.busy:
                    self._lock.wait(timeout=0.5)
                if not self._running:
                    return
            self.step()

    def step(self) -> None:
        """One turn of the engine thread: queue what arrived, drop what was cancelled, admit,
        one prefill chunk, one decode step. Without `start()`, the caller drives the batcher."""
        with self._lock:
            self._queue += self._inbox
            self._inbox = []
        try:
            self._step()
        except Exception as e:  # an engine failure fails the requests in flight, not the server
            for request in [r for r, _ in self._prefilling] + self.batch.requests():
                request.fail(500, f"generation failed: {type(e).__name__}: {e}")
            self._prefilling = []
            self.batch = BatchKV(self.rows.programs, self.max_batch)
        self._report()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        start, chunk = time.perf_counter(), bool(self._prefilling)
        if chunk:
            self._prefill_one_chunk()
        if self.batch.live():
            self._decode()
        if chunk:  # its compute is waited for by the first token or the decode step after it
            self.costs.turn_ran(time.perf_counter() - start)
        self._fit()

    def _fit(self, joining: Request | None = None) -> None:
        """The batch cache's bucket for its live rows (and `joining`)."""
        live = self.batch.requests() + ([joining] if joining else [])
        self.batch.fit(len(live), max((h.cache_len for h in live), default=64), self.rows.new_kv)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._queue if r.cancelled] + [r for r, _ in self._prefilling if r.cancelled]
        if gone:
            self._queue = [r for r in self._queue if not r.cancelled]
            self._prefilling = [(r, job) for r, job in self._prefilling if not r.cancelled]
            for request in gone:
                self._done(request, None)
        for row, holder in enumerate(self.batch.holders):
            if holder is not None and holder.cancelled:
                self._leave(row, None)

    def _admit(self) -> None:
        free = self.max_batch - len(self.batch.live()) - len(self._prefilling)
        if self.static and (self.batch.live() or self._prefilling):
            free = 0
        if free > 0 and self._queue:
            now = time.perf_counter()
            self._queue = order(self.schedule, self._queue, now, self.costs)
        while free > 0 and self._queue:
            request = self._queue.pop(0)
            request.cache_len = self.rows.cache_length(len(request.prompt), request.max_tokens)
            self._prefilling.append((request, self.rows.prefill(request.prompt, request.cache_len)))
            free -= 1

    def _prefill_one_chunk(self) -> None:
        """A chunk of the first prompt in the schedule's order; the prompt joins the batch when its
        last chunk is done."""
        left = {r.number: job.chunks_left for r, job in self._prefilling}
        first = order(self.schedule, [r for r, _ in self._prefilling], time.perf_counter(), self.costs, left)[0]
        request, job = next(p for p in self._prefilling if p[0] is first)
        job.step()
        self.interleaved_chunks += bool(self.batch.live())
        if not job.done:
            return
        self._prefilling.remove((request, job))
        token, row_kv = job.first_token(row_sampling([request.sampling], np.zeros(1)))
        request.joined_at = time.perf_counter()
        reason = request.add_token(token, request.joined_at)
        if reason:  # done at its first token: it never needs a row (nor a longer batch cache)
            self._done(request, reason)
            return
        self._fit(request)
        self.batch.put(request, row_kv)

    def _decode(self) -> None:
        holders = self.batch.holders
        b = len(holders)
        tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
        valid, steps = np.zeros(b, bool), np.zeros(b, np.int32)
        for row, h in enumerate(holders):
            if h is not None:
                tokens[row], positions[row], valid[row], steps[row] = h.tokens[-1], h.position, True, len(h.tokens)
        sampling = row_sampling([h.sampling if h else None for h in holders], steps)
        out, self.batch.kv = self.rows.decode(self.batch.kv, tokens, positions, valid, sampling)
        self.steps += 1
        now = time.perf_counter()
        for row, h in enumerate(holders):
            if h is not None:
                reason = h.add_token(int(out[row]), now)
                if reason:
                    self._leave(row, reason)

    def _leave(self, row: int, reason: str | None) -> None:
        """Free the row; `reason` None: cancelled (nobody is listening)."""
        request = self.batch.holders[row]
        self.batch.free(row)
        self._done(request, reason)

    def _done(self, request: Request, reason: str | None) -> None:
        if request.joined_at is not None:
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - request.joined_at)
        if self.metrics:  # before the client hears: a /metrics read after a response counts it
            self.metrics.finished(request, reason)
        request.finish(reason)

    def _report(self) -> None:
        if self.metrics:
            self.metrics.batch_state(self.queue_depth, self.running, self.rows.counters())
