"""`ThreadEngine`: a fixed pool of sending threads inside one actor (the design's default)."""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable

from ..messages import Message
from .base import ABANDONED, ChainingSender, Sender, SendResult, WarmingSender
from .engine import Engine, _Job


def _call(send: Callable[[Message], SendResult], message: Message) -> SendResult:
    try:
        return send(message)
    except Exception as exc:  # noqa: BLE001 - a sender bug must not kill the worker thread
        return SendResult("transient", f"{type(exc).__name__}: {exc}")


class ThreadEngine(Engine):
    """`concurrency` threads, one ready queue, one timer thread for retries."""

    def __init__(self, sender: Sender, *, warm: bool = False, **kwargs: object) -> None:
        """`warm`: each thread opens its connection as it starts (a WarmingSender's)."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sender = sender
        self._warm = warm
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
        # A chaining sender (SMTP with PIPELINING) may begin this thread's next job while the
        # current one's data goes out, one write and one read a message instead of two each
        # (docs/ray-notes.md, "Chained sends"). Not under --rate: a transaction starts only
        # once its turn has come.
        # `ahead`: the job `upcoming` took, under way, this thread's next; and when its commands
        # went out, where its attempt began (a round trip before the job before it settles).
        ahead: list[tuple[_Job, float]] = []

        def upcoming() -> Message | None:
            if ahead or self._stopping.is_set():
                return None
            try:
                job = ready.get_nowait()
            except queue.Empty:
                return None
            if job is None:  # close(): the thread ends once this job is over
                ready.put(None)
                return None
            ahead.append((job, time.time()))
            return job.message

        send: Callable[[Message], SendResult] = sender.send
        if isinstance(sender, ChainingSender) and limiter is None:
            chaining = sender

            def send(message: Message) -> SendResult:
                return chaining.send_then(message, upcoming)

        if self._warm and isinstance(sender, WarmingSender) and not (
                self._closed or self._stopping.is_set()):
            sender.warm()
        while True:
            if ahead:  # its commands went out: in flight, it finishes even after a stop
                job, t0 = ahead.pop()
            else:
                got = ready.get()
                if got is None:
                    return
                job = got
                if self._stopping.is_set():
                    self._abandon(job)
                    continue
                if limiter is not None:
                    limiter.wait()
                    if self._stopping.is_set():  # stopped while waiting for its turn
                        self._abandon(job)
                        continue
                t0 = time.time()
            result = _call(send, job.message)
            if result is ABANDONED:  # the sender was cancelled by a stop before sending
                self._abandon(job)
                continue
            t1 = time.time()
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
