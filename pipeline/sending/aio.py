"""`AsyncEngine`: tens of thousands of concurrent sends as coroutines on one event loop."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

from ..ledger import SENT
from .base import ABANDONED, AsyncSender, SendResult, ServingSender
from .engine import BatchCounts, Engine, _Job


class AsyncEngine(Engine):
    """`concurrency` coroutines on one event loop in a background thread.

    A fixed set of workers pulling from one queue, not one task per email: one task per email
    behind a semaphore measured quadratic here (54 s of CPU for 200,000 emails, docs/ray-notes.md),
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
        if isinstance(self.sender, ServingSender):  # SMTP: its pumps take from the queue
            self._workers = [self._loop.create_task(self.sender.serve(self, self.concurrency))]
        else:
            self._workers = [self._loop.create_task(self._worker())
                             for _ in range(self.concurrency)]
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

    # -- the pumps' source (pump.Source), and the workers'
    def pending(self) -> bool:
        return bool(self._ready)

    def putback(self, job: _Job) -> None:
        if self._stopping.is_set():  # the queue was drained already: abandoned (resume sends it)
            return self._abandon(job)
        self._ready.appendleft(job)
        self._wake(1)
        return None

    def take(self) -> _Job | None:
        ready = self._ready
        while ready:
            job = ready.popleft()
            if not self._stopping.is_set():
                return job
            self._abandon(job)
        return None

    async def wait(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._idle.append(fut)
        await fut

    @property
    def paced(self) -> bool:
        return self.limiter is not None

    async def turn(self) -> bool:
        """A turn of the global rate limit; False when the run stopped meanwhile."""
        if self.limiter is not None:
            await self.limiter.await_turn()
        return not self._stopping.is_set()

    def done(self, job: _Job, result: SendResult, t0: float, t1: float) -> None:
        if result is ABANDONED:  # the sender was cancelled by a stop before sending
            return self._abandon(job)
        if result.status == "sent" and job.attempts == 0:
            # The common case, inlined: first attempt delivered (same effect as _settle).
            job.attempts = 1
            m = job.message
            self.ledger.record(m.id, m.to, SENT, 1, None, t0, t1, t1 - t0, m.message_id)
            if self.observer is not None:
                self.observer(SENT, t1 - t0, 1)
            b = job.batch
            c = b.counts
            c.sent += 1
            c.attempts += 1
            b.remaining -= 1
            if b.remaining == 0:
                b.done.set()
            return None
        delay = self._settle(job, result, t0, t1)
        if delay is not None:
            self._timers[job] = self._loop.call_later(delay, self._requeue, job)
        return None

    async def _worker(self) -> None:
        asend, now = self.sender.asend, time.time
        while True:
            job = self.take()
            if job is None:
                await self.wait()
                continue
            # Awaited only with a rate limit: a coroutine per email is a cost at 100,000/s.
            if self.limiter is not None and not await self.turn():  # stopped meanwhile
                self._abandon(job)
                continue
            t0 = now()
            try:
                result = await asend(job.message)
            except Exception as exc:  # noqa: BLE001 - a sender bug must not kill the worker
                result = SendResult("transient", f"{type(exc).__name__}: {exc}")
            self.done(job, result, t0, now())

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
            await asyncio.gather(*self._workers, return_exceptions=True)
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
