"""Concurrent send engines that live inside one sender actor (no Ray here).

An engine owns a fixed set of workers (threads, or coroutines on one event loop) that pull from
one ready queue, so the pool stays full across batch boundaries: `run(batch)` only enqueues and
waits, and while one batch drains, the next one is already queued behind it. A transient
failure goes to a delay queue and comes back after its backoff; the worker moves on at once, so
a retry never holds a slot while it waits.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import RetryPolicy
from ..ledger import FAILED, SENT, LedgerWriter
from ..messages import Message
from .base import SendResult


class Limiter(Protocol):
    """Grants the right to start one send (a global rate limit lives behind this)."""

    def wait(self) -> None: ...
    async def await_turn(self) -> None: ...
    # Optional: `cancel()` wakes every waiter at once (called by `Engine.stop`); a waiter woken
    # so returns without a turn, and the engine abandons its message instead of sending it.


Observer = Callable[[str, float, int], None]  # (status, latency seconds, attempts)
STOP_POLL = 0.25  # seconds between stop checks while a batch runs


@dataclass(slots=True)
class BatchCounts:
    sent: int = 0
    failed: int = 0
    abandoned: int = 0  # left unsent because a stop was requested; resume sends them
    attempts: int = 0
    retries: int = 0


class _Batch:
    __slots__ = ("remaining", "done", "counts", "lock")

    def __init__(self, n: int) -> None:
        self.remaining = n
        self.done = threading.Event()
        self.counts = BatchCounts()
        self.lock = threading.Lock()
        if n == 0:
            self.done.set()


class _Job:
    __slots__ = ("message", "batch", "attempts", "started")

    def __init__(self, message: Message, batch: _Batch) -> None:
        self.message = message
        self.batch = batch
        self.attempts = 0
        self.started: float | None = None


class Engine:
    """Common bookkeeping: settle a job (record, retry or finish) and stop on request."""

    def __init__(self, *, concurrency: int, retry: RetryPolicy, ledger: LedgerWriter,
                 limiter: Limiter | None = None, observer: Observer | None = None,
                 seed: int | None = None) -> None:
        self.concurrency = concurrency
        self.retry = retry
        self.ledger = ledger
        self.limiter = limiter
        self.observer = observer
        self._rng = random.Random(seed)
        self._stopping = threading.Event()
        self._last_poll = float("-inf")

    # -- public
    def run(self, messages: Sequence[Message], *,
            should_stop: Callable[[], bool] | None = None) -> BatchCounts:
        """Send `messages`; return when each one is recorded (or abandoned after a stop).

        `should_stop` is asked every `STOP_POLL` seconds from the calling thread while the batch
        runs; when it says yes, the engine stops (see `stop`).
        """
        batch = _Batch(len(messages))
        if should_stop is not None:
            self._poll(should_stop)  # batches shorter than STOP_POLL must see a stop too
        if messages:
            self._submit([_Job(m, batch) for m in messages])
            while not batch.done.wait(STOP_POLL if should_stop else None):
                if should_stop is not None:
                    self._poll(should_stop)
        return batch.counts

    def _poll(self, should_stop: Callable[[], bool]) -> None:
        """Ask `should_stop` at most once per STOP_POLL seconds across all calling threads."""
        now = time.monotonic()
        if self.stopping or now - self._last_poll < STOP_POLL:
            return
        self._last_poll = now
        if should_stop():
            self.stop()

    def stop(self) -> None:
        """Stop starting sends: in-flight ones finish, queued and waiting ones are abandoned."""
        self._stopping.set()
        # Workers asleep until a rate-limit slot (the global one, or a relay's inside the
        # sender: the subclasses' `sender`) wake up now.
        for waits in (self.limiter, getattr(self, "sender", None)):
            cancel = getattr(waits, "cancel", None)
            if cancel is not None:
                cancel()
        self._drain()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def close(self) -> None:
        raise NotImplementedError

    # -- for subclasses
    def _submit(self, jobs: list[_Job]) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        raise NotImplementedError

    def _backoff(self, attempts: int) -> float:
        r = self.retry
        return self._rng.uniform(0, min(r.backoff_cap, r.backoff_base * 2 ** (attempts - 1)))

    def _finish(self, job: _Job, counts_update: Callable[[BatchCounts], None]) -> None:
        b = job.batch
        with b.lock:
            counts_update(b.counts)
            b.remaining -= 1
            if b.remaining == 0:
                b.done.set()

    def _abandon(self, job: _Job) -> None:
        def upd(c: BatchCounts) -> None:
            c.abandoned += 1
        self._finish(job, upd)

    def _settle(self, job: _Job, result: SendResult, t0: float, t1: float) -> float | None:
        """Record the attempt's outcome. Returns a retry delay when the job must go again."""
        if job.started is None:
            job.started = t0
        job.attempts += 1
        attempts = job.attempts
        m = job.message
        if result.status == "transient" and attempts < self.retry.max_attempts \
                and not self._stopping.is_set():
            if self.observer:
                self.observer("retried", t1 - t0, attempts)
            return self._backoff(attempts)
        status = SENT if result.ok else FAILED
        self.ledger.record(m.id, m.to, status, attempts, result.error, job.started, t1, t1 - t0,
                           m.message_id)
        if self.observer:
            self.observer(status, t1 - t0, attempts)

        def upd(c: BatchCounts) -> None:
            if status == SENT:
                c.sent += 1
            else:
                c.failed += 1
            c.attempts += attempts
            c.retries += attempts - 1
        self._finish(job, upd)
        return None
