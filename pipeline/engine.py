"""Concurrent send engines that live inside one sender actor (no Ray here).

An engine owns a fixed set of workers (threads, or coroutines on one event loop) that pull from
one ready queue, so the pool stays full across batch boundaries: `run(batch)` only enqueues and
waits, and while one batch drains, the next one is already queued behind it. A transient
failure goes to a delay queue and comes back after its backoff; the worker moves on at once, so
a retry never holds a slot while it waits.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import RetryPolicy
from .ledger import FAILED, SENT, LedgerWriter
from .messages import Message
from .senders import AsyncSender, Sender, SendResult


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
        self.in_flight = 0  # sends under way now (read by metrics; racy reads are fine)

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
        cancel = getattr(self.limiter, "cancel", None)
        if cancel is not None:  # workers asleep until a rate-limit slot wake up now
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


def _call(sender: Sender, message: Message) -> SendResult:
    try:
        return sender.send(message)
    except Exception as exc:  # noqa: BLE001 - a sender bug must not kill the worker thread
        return SendResult("transient", f"{type(exc).__name__}: {exc}")


class ThreadEngine(Engine):
    """`concurrency` threads, one ready queue, one timer thread for retries."""

    def __init__(self, sender: Sender, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sender = sender
        self._ready: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._delayed: list[tuple[float, int, _Job]] = []
        self._delayed_cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"send-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        self._timer = threading.Thread(target=self._timer_loop, name="retry-timer", daemon=True)
        self._timer.start()

    def _submit(self, jobs: list[_Job]) -> None:
        if self._stopping.is_set():
            for j in jobs:
                self._abandon(j)
            return
        for j in jobs:
            self._ready.put(j)

    def _worker(self) -> None:
        ready, sender, limiter = self._ready, self.sender, self.limiter
        while True:
            job = ready.get()
            if job is None:
                return
            if self._stopping.is_set():
                self._abandon(job)
                continue
            if limiter is not None:
                limiter.wait()
                if self._stopping.is_set():  # stopped while waiting for its turn
                    self._abandon(job)
                    continue
            self.in_flight += 1
            t0 = time.time()
            result = _call(sender, job.message)
            t1 = time.time()
            self.in_flight -= 1
            delay = self._settle(job, result, t0, t1)
            if delay is not None:
                with self._delayed_cv:
                    heapq.heappush(self._delayed, (t1 + delay, next(self._seq), job))
                    self._delayed_cv.notify()

    def _timer_loop(self) -> None:
        cv = self._delayed_cv
        while True:
            with cv:
                while not self._closed and (not self._delayed or self._delayed[0][0] > time.time()):
                    timeout = self._delayed[0][0] - time.time() if self._delayed else None
                    cv.wait(timeout)
                if self._closed:
                    return
                due = []
                now = time.time()
                while self._delayed and self._delayed[0][0] <= now:
                    due.append(heapq.heappop(self._delayed)[2])
            for job in due:
                if self._stopping.is_set():
                    self._abandon(job)
                else:
                    self._ready.put(job)

    def _drain(self) -> None:
        with self._delayed_cv:
            waiting = [j for _, _, j in self._delayed]
            self._delayed.clear()
        for job in waiting:
            self._abandon(job)
        # Jobs still in the ready queue are abandoned by the workers as they pull them.

    def close(self) -> None:
        self._closed = True
        with self._delayed_cv:
            self._delayed_cv.notify_all()
        for _ in self._threads:
            self._ready.put(None)
        self.sender.close()


class AsyncEngine(Engine):
    """`concurrency` coroutines on one event loop in a background thread.

    A fixed set of workers pulling from one queue, not one task per email: one task per email
    behind a semaphore measured quadratic here (54 s of CPU for 200,000 emails, RAY-NOTES.md),
    while fixed workers reached 94% of ideal at 10,000 concurrent sends.

    Per-email CPU is what bounds this mode (about 10 µs per email for a bare asyncio loop on
    this machine), so the hot path is kept flat: the ready queue is a plain deque that a worker
    pops without awaiting (an asyncio.Queue costs a loop-bound check and a waiter wake-up per
    item, 20% of the actor's CPU at 25,000 workers in a py-spy profile); a worker parks on a
    future only when the deque is empty; every batch counter and the delay timers are touched
    only on the loop thread, so no lock is taken per email. The loop is uvloop's when it is
    installed (its timers are C; asyncio's heap compares TimerHandles in Python).
    """

    def __init__(self, sender: AsyncSender, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sender = sender
        self._loop = new_event_loop()
        self._ready: collections.deque[_Job] = collections.deque()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timers: dict[_Job, asyncio.TimerHandle] = {}  # delayed retries, by job
        self._workers: list[asyncio.Task[None]] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(started,),
                                        name="send-loop", daemon=True)
        self._thread.start()
        started.wait()

    def _run_loop(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._workers = [self._loop.create_task(self._worker()) for _ in range(self.concurrency)]
        started.set()
        self._loop.run_forever()

    def _submit(self, jobs: list[_Job]) -> None:
        self._loop.call_soon_threadsafe(self._enqueue, jobs)

    def _wake(self, n: int) -> None:
        idle = self._idle
        while n > 0 and idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def _enqueue(self, jobs: list[_Job]) -> None:
        if self._stopping.is_set():
            for j in jobs:
                self._abandon(j)
            return
        self._ready.extend(jobs)
        self._wake(len(jobs))

    def _requeue(self, job: _Job) -> None:
        self._timers.pop(job, None)
        if self._stopping.is_set():
            self._abandon(job)
        else:
            self._ready.append(job)
            self._wake(1)

    def _finish(self, job: _Job, counts_update: Callable[[BatchCounts], None]) -> None:
        # Only ever called on the loop thread: no lock.
        b = job.batch
        counts_update(b.counts)
        b.remaining -= 1
        if b.remaining == 0:
            b.done.set()

    async def _worker(self) -> None:
        ready, idle, loop = self._ready, self._idle, self._loop
        asend, limiter, stopping = self.sender.asend, self.limiter, self._stopping
        record, observer = self.ledger.record, self.observer
        now = time.time
        while True:
            if not ready:
                fut: asyncio.Future[None] = loop.create_future()
                idle.append(fut)
                await fut
                continue
            job = ready.popleft()
            if stopping.is_set():
                self._abandon(job)
                continue
            if limiter is not None:
                await limiter.await_turn()
                if stopping.is_set():  # stopped while waiting for its turn
                    self._abandon(job)
                    continue
            self.in_flight += 1
            t0 = now()
            try:
                result = await asend(job.message)
            except Exception as exc:  # noqa: BLE001 - a sender bug must not kill the worker
                result = SendResult("transient", f"{type(exc).__name__}: {exc}")
            t1 = now()
            self.in_flight -= 1
            if result.status == "sent" and job.attempts == 0:
                # The common case, inlined: first attempt delivered (same effect as _settle).
                job.attempts = 1
                m = job.message
                record(m.id, m.to, SENT, 1, None, t0, t1, t1 - t0, m.message_id)
                if observer is not None:
                    observer(SENT, t1 - t0, 1)
                b = job.batch
                c = b.counts
                c.sent += 1
                c.attempts += 1
                b.remaining -= 1
                if b.remaining == 0:
                    b.done.set()
                continue
            delay = self._settle(job, result, t0, t1)
            if delay is not None:
                self._timers[job] = loop.call_later(delay, self._requeue, job)

    def _drain(self) -> None:
        self._loop.call_soon_threadsafe(self._drain_on_loop)

    def _drain_on_loop(self) -> None:
        # Queued jobs and delayed retries are abandoned (a resume sends them); in-flight ones finish.
        ready = self._ready
        while ready:
            self._abandon(ready.popleft())
        timers, self._timers = self._timers, {}
        for job, handle in timers.items():
            handle.cancel()
            self._abandon(job)

    def close(self) -> None:
        async def shutdown() -> None:
            for w in self._workers:
                w.cancel()
            await self.sender.aclose()
        fut = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        try:
            fut.result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (timers and callbacks in C), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
