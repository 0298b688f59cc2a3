"""A global send-rate limit shared by every sender actor on every node (no Ray here).

`SlotSchedule` is the one authority (actors.py runs it as a Ray actor pinned to the driver's
node). It hands out send *slots*: instants spaced exactly 1/rate apart, each one to exactly one
sender, never in the past. A sender starts an email at or after a slot it holds, never before,
so no window of time can hold more starts than slots, whatever the number of actors or nodes.

`SlotLimiter` is the engine's `Limiter` inside one actor. A worker that has a message in hand
takes the earliest slot its actor holds and sleeps until it. A helper thread keeps slots in hand
ahead of need, in chunks (a few round trips a second, not one per email), so a grant that comes
back late on a loaded machine delays nothing. An actor that runs out of work gives back the
slots it holds and the schedule hands them to the next actor that asks, so an idle actor leaves
no hole in the global rate. An actor that dies, or a node that is lost, takes only the slots it
held (about half a second of its share: the rate dips, it never overshoots); a restarted actor
simply asks for new slots.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import threading
import time
from collections.abc import Callable
from typing import Any

Grant = tuple[list[float], float]  # (slot times, ascending; if empty: when to ask again)
MIN_LEAD = 0.005  # seconds: a slot granted closer than this would reach a worker late


class SlotSchedule:
    """Grants send slots spaced `1/rate` apart, each slot once; takes back unused ones.

    `lead`: every granted slot is at least this far in the future, so it reaches the sender
    before it is due; an asker may name a shorter one (`SlotLimiter` asks for twice its
    measured round trip: ~1 ms on one host, a few ms across nodes, tens on a loaded machine)
    and this default serves the rest and a first request. `horizon`: no slot further ahead
    than this, which bounds what the actors can hold between them (rate × horizon slots).
    """

    def __init__(self, rate: float, *, lead: float = 0.05, horizon: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.interval = 1.0 / rate
        self.lead = lead
        self.horizon = max(horizon, lead + self.interval)
        self._clock = clock
        self._next = 0.0  # the first slot never granted
        self._returned: list[float] = []  # a heap of slots given back, granted again first
        self.granted = 0
        self.regranted = 0

    def grant(self, n: int, lead: float | None = None) -> Grant:
        now = self._clock()
        earliest = now + (self.lead if lead is None else min(max(lead, 0.0), self.lead))
        returned = self._returned
        while returned and returned[0] < earliest:  # too close to be delivered in time
            heapq.heappop(returned)
        slots = [heapq.heappop(returned) for _ in range(min(n, len(returned)))]
        self.regranted += len(slots)
        start = max(self._next, earliest)
        room = int((now + self.horizon - start) / self.interval + 1e-9)  # 1e-9: float division
        fresh = max(0, min(n - len(slots), room))
        if fresh:
            slots.extend(start + i * self.interval for i in range(fresh))
            self._next = start + fresh * self.interval
        self.granted += len(slots)
        slots.sort()
        # Empty: every slot within the horizon is taken; the next one enters it at this time.
        return slots, start - self.horizon + self.interval

    def release(self, slots: list[float]) -> None:
        """Slots an actor will not use: granted again to whoever asks next, if still in time."""
        earliest = self._clock() + MIN_LEAD  # an asker may take it up to this close (grant)
        for s in slots:
            if s >= earliest:
                heapq.heappush(self._returned, s)

    def now(self) -> float:
        """This schedule's clock, for `estimate_offset` on another node."""
        return self._clock()


def estimate_offset(remote_now: Callable[[], float], *, samples: int = 5,
                    clock: Callable[[], float] = time.time) -> float:
    """Seconds to subtract from the schedule's times to get this host's clock (Cristian's
    method: the sample with the shortest round trip, error at most half of it). On one host it
    is ~0; across nodes it removes clock skew that NTP left."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t0 = clock()
        remote = remote_now()
        t1 = clock()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, remote - (t0 + t1) / 2)
    return best[1] if best else 0.0


class SlotLimiter:
    """The engine's `Limiter` inside one actor: `wait()` for threads, `await_turn()` for asyncio.

    `grant(n, lead)` and `release(slots)` reach the schedule (blocking calls, made only by this
    limiter's helper thread). The helper asks for a slot for every waiter that has none, and
    keeps a reserve of this actor's use in hand so that a slow round trip delays no send: three
    of the slowest recent round trips' worth, within `ahead` (0.05-0.5 s). Not when the rate
    binds (grants land beyond that reserve, because the workers of all actors already hold that
    much): then waiters alone decide, which shares the rate among the actors by demand and
    adapts at once when one runs out of work, and an actor whose work runs out holds nothing
    another could have used. It gathers requests for up to `linger` (20 ms), so one round trip
    serves many sends (5-50 a second per busy actor, not one per email). `max_chunk` caps one
    request. `give_back()` returns the slots in hand when the actor runs out of work; the next
    requests get them first.

    The lead asked for (how far ahead of now the slots must be) is twice the slowest recent
    round trip, at least MIN_LEAD (5 ms) and at most the schedule's own lead (50 ms), which
    also serves the first request, before any round trip is measured. When the rate binds it
    is dead time for every worker after each send: the schedule's fixed 50 ms held 10
    connections of 50 ms sends to 81-86/s at a rate of 100 (tests/test_rate.py).

    A slot still untaken `late_ok` seconds after it was due is dropped rather than spent late,
    so any window of W seconds holds at most rate × (W + late_ok) starts (plus any the sender
    process itself was too starved of CPU to start on time): 5% over for 1 s windows at the
    default, and only right after a stall that held sends back. A failing grant (the schedule
    is gone, so the run is ending) is retried every `retry_after` seconds: a sender never starts
    without a slot.
    """

    def __init__(self, grant: Callable[[int, float | None], Grant], *, max_chunk: int,
                 release: Callable[[list[float]], None] | None = None, offset: float = 0.0,
                 ahead: tuple[float, float] = (0.05, 0.5), linger: float = 0.02,
                 late_ok: float = 0.05,
                 clock: Callable[[], float] = time.time, retry_after: float = 1.0) -> None:
        self._grant = grant
        self._release = release
        self.max_chunk = max(1, max_chunk)
        self._offset = offset
        self._ahead_min, self._ahead_max = ahead
        self._ahead = ahead[0]  # seconds of reserve now, between the two, from round trips
        self._rtt = 0.0  # the slowest recent grant round trip (decays)
        self._linger = linger
        self._late_ok = late_ok
        self._clock = clock
        self._retry_after = retry_after
        self._cancelled = threading.Event()
        self._cv = threading.Condition()
        self._slots: collections.deque[float] = collections.deque()  # this host's clock
        self._backlogged = False  # grants land beyond `ahead`: fetch for waiters only
        self._hungry = 0  # waiters (threads or coroutines) that found no slot
        self._async_waiters: collections.deque[asyncio.Future[float]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._helper: threading.Thread | None = None
        self._taken_at_fetch = 0
        self._last_fetch = clock()
        self._rate = 0.0  # slots this actor took per second, measured between fetches
        self.slots_taken = 0
        self.slots_dropped = 0
        self.slots_released = 0
        self.grant_calls = 0

    # -- bookkeeping (under self._cv)
    def _pop(self) -> float | None:
        """The earliest slot not yet too late, dropping stale ones."""
        slots = self._slots
        too_old = self._clock() - self._late_ok
        dropped = False
        while slots and slots[0] < too_old:
            slots.popleft()
            self.slots_dropped += 1
            dropped = True
        slot = slots.popleft() if slots else None
        if slot is not None:
            self.slots_taken += 1
        if len(slots) < self._reserve() or (not slots and (dropped or slot is not None)
                                             and self._hungry):
            # The helper tops the reserve up; and it sleeps once the deque holds what the
            # waiters want, so a deque emptied under a waiter must wake it. Twice a waiting
            # thread slept for good without this: the slots it was woken for were stale on
            # arrival (the last batch of a run hung, after an actor kill), or a thread that
            # came later took them first (test_rate's pacing test hung, 2 cores under load).
            # Not on a pop that found nothing to remove: woken waiters would wake each other.
            self._cv.notify_all()
        return slot

    def _reserve(self) -> int:
        """Slots to keep in hand beyond the waiters' own."""
        return 0 if self._backlogged else math.ceil(self._rate * self._ahead)

    def _want(self) -> int:
        """Slots to ask for now: one per waiter without one, and the reserve topped up."""
        return min(self.max_chunk, max(0, self._hungry + self._reserve() - len(self._slots)))

    def give_back(self) -> int:
        """Return every slot in hand to the schedule, for other actors to use. Call it when this
        actor has no work (its last batch is done): idle, it would otherwise leave a hole of up
        to `ahead` seconds of its share in the global rate. Returns the number given back."""
        with self._cv:
            slots = list(self._slots)
            self._slots.clear()
            self._rate = 0.0  # a later batch starts again from its workers' own demand
        if slots and self._release is not None:
            try:
                self._release([s + self._offset for s in slots])
                self.slots_released += len(slots)
            except Exception:  # noqa: BLE001 - they are lost: the rate dips, never overshoots
                pass
        return len(slots)

    def _ensure_helper(self) -> None:
        if self._helper is None:
            self._helper = threading.Thread(target=self._helper_loop, name="rate-slots",
                                            daemon=True)
            self._helper.start()

    def _helper_loop(self) -> None:
        cv = self._cv
        while not self._cancelled.is_set():
            with cv:
                while not self._cancelled.is_set() and self._want() == 0:
                    cv.wait()
                # Gather what else is wanted for a moment, so that one round trip serves many.
                # With the reserve in hand this delays no send; when the rate binds (no
                # reserve) a waiter waits up to this much longer, the largest part of its dead
                # time after the lead was cut to the round trip. Frequent small requests also
                # pick up slots another actor gave back while they are still ahead.
                deadline = self._clock() + self._linger
                while not self._cancelled.is_set() and self._want() < self.max_chunk \
                        and (left := deadline - self._clock()) > 0:
                    cv.wait(left)
                if self._cancelled.is_set():
                    return
                now = self._clock()
                if now - self._last_fetch >= 0.05:  # shorter spans make a noisy estimate
                    self._rate = (self.slots_taken - self._taken_at_fetch) / (now - self._last_fetch)
                    self._taken_at_fetch, self._last_fetch = self.slots_taken, now
                n = self._want()
            if n == 0:
                continue
            t0 = self._clock()
            slots, retry_at = self._fetch(n)
            # The reserve covers three of the slowest recent round trips (a loaded machine or a
            # distant node), and shrinks back (5% a request) once they are fast again.
            self._rtt = max(self._clock() - t0, self._rtt * 0.95)
            self._ahead = min(self._ahead_max, max(self._ahead_min, 3 * self._rtt + self._linger))
            if not slots:  # every slot within the schedule's horizon is taken: wait for it
                self._cancelled.wait(max(0.0, retry_at - self._clock()))
                continue
            with cv:
                self._backlogged = slots[0] - self._clock() > self._ahead
                self._slots.extend(slots)
                if len(self._slots) > len(slots) and self._slots[-len(slots) - 1] > slots[0]:
                    # Given-back slots granted again can come before ones already in hand.
                    self._slots = collections.deque(sorted(self._slots))
                cv.notify_all()
                if self._async_waiters:
                    self._serve_async()

    def _fetch(self, n: int) -> Grant:
        while True:
            try:
                self.grant_calls += 1
                # None until a round trip is measured (a first call, or retries of one that
                # failed); the round trip a retry measures includes its waits, so the lead
                # stays at the schedule's 50 ms for a while after an outage.
                lead = max(MIN_LEAD, 2 * self._rtt) if self._rtt > 0 else None
                slots, retry_at = self._grant(n, lead)
                return [s - self._offset for s in slots], retry_at - self._offset
            except Exception:  # noqa: BLE001 - the schedule is unreachable: never send unpaced
                if self._cancelled.wait(self._retry_after):
                    return [], self._clock()

    def cancel(self) -> None:
        """Wake every waiter now; they return without a slot (the engine is stopping and
        abandons their messages instead of sending them)."""
        self._cancelled.set()
        with self._cv:
            self._cv.notify_all()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: nobody is waiting on it
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- threads
    def wait(self) -> None:
        cv = self._cv
        with cv:
            slot = self._pop()
            if slot is None:
                self._ensure_helper()
                self._hungry += 1
                cv.notify_all()
                try:
                    while slot is None and not self._cancelled.is_set():
                        cv.wait()
                        slot = self._pop()
                finally:
                    self._hungry -= 1
            if slot is None:
                return
        delay = slot - self._clock()
        if delay > 0:
            self._cancelled.wait(delay)

    # -- asyncio
    def _serve_async(self) -> None:
        """Hand slots to coroutines waiting for one (under self._cv, from the helper)."""
        loop = self._loop
        waiters = self._async_waiters
        while waiters and loop is not None:
            if waiters[0].done():  # cancelled while waiting
                waiters.popleft()
                self._hungry -= 1
                continue
            slot = self._pop()
            if slot is None:
                return
            fut = waiters.popleft()
            self._hungry -= 1
            loop.call_soon_threadsafe(_resolve, fut, slot)

    async def await_turn(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._wake = loop, asyncio.Event()
        if self._cancelled.is_set():
            return
        with self._cv:
            slot = self._pop()
            if slot is None:
                fut: asyncio.Future[float] = loop.create_future()
                self._async_waiters.append(fut)
                self._hungry += 1
                self._ensure_helper()
                self._cv.notify_all()
        assert self._wake is not None
        wake = loop.create_task(self._wake.wait())
        try:
            if slot is None:
                either: list[asyncio.Future[Any]] = [fut, wake]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not fut.done() or fut.cancelled():
                    fut.cancel()
                    return
                slot = fut.result()
            delay = slot - self._clock()
            if delay > 0:
                await asyncio.wait([wake], timeout=delay)
        finally:
            wake.cancel()


def _resolve(fut: asyncio.Future[float], slot: float) -> None:
    if not fut.done():
        fut.set_result(slot)
