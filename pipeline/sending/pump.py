"""Connection pumps: how the async SMTP sender moves messages (no Ray).

One coroutine per connection takes messages from a `Source` (the AsyncEngine's ready queue, or
AsyncSmtpSender.asend's own queue) and runs their transactions over its connection, the
protocol steps coming from wire.Session. With PIPELINING, the moment a message's DATA is
answered 354 its data and "." go out in one write together with the next message's MAIL, RCPT
and DATA, and the replies to both come back together: one write and one read a message, as in
the raw client of scripts/bench_smtp_clients.py. A worker coroutine per send, each awaiting a
connection from a shared pool, cost 56-57 µs of CPU a message in scripts/bench_send_loop.py;
pumps whose writes go out once per loop round (aio_connection.WriteBatch) 43-45
(docs/ray-notes.md, "Connection pumps").

Delivery rules (the same as the threaded sender's, smtp.py's docstring):
- a connection that broke before a message's data was written cannot have delivered it: the
  message goes out at once on a new connection (once; on another relay if its connection was
  fresh); one that broke after the data fails that message only, as transient (retried later);
- without PIPELINING, or where a rate limit paces each transaction, nothing overlaps: one
  transaction at a time, lock-step as wire.Session says;
- a connection reaches `max_per_connection` transactions, then says QUIT; a 421 closes it;
- a pump holds a message only while it has a connection (see `Pump`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ..compose import Envelope
from .aio_connection import AsyncConnection
from .base import ABANDONED, SendResult
from .relays import Failover, RelayState, connection_result
from .wire import CLOSED, FINAL, Flow


class Job(Protocol):
    message: Any  # a messages.Message to compose, or an Envelope already composed


class Source(Protocol):
    """Where a pump's messages come from, and where their outcomes go."""

    def pending(self) -> bool:
        """Whether `take` has a message now."""

    def putback(self, job: Any) -> None:
        """`job`, taken but not sent, goes first again."""

    def take(self) -> Job | None:
        """The next message to send; None when there is none now (or the run is stopping)."""

    async def wait(self) -> None:
        """Until `take` may have a message again."""

    async def turn(self) -> bool:
        """The right to start one transaction (a global rate limit lives here); False: the run
        stopped while waiting, the message is abandoned."""

    @property
    def paced(self) -> bool:
        """Transactions wait for `turn`: none may overlap another."""

    def done(self, job: Any, result: SendResult, t0: float, t1: float) -> None:
        """One attempt's outcome (ABANDONED: not sent, not an attempt)."""


class Opener(Protocol):
    """What a pump needs of its sender (smtp.AsyncSmtpSender)."""

    max_per_connection: int

    def envelope_of(self, message: Any) -> Envelope | SendResult: ...
    async def connect(self, f: Failover, *, still_wanted: Callable[[], bool] | None = None,
                      at_cap: Callable[[], None] | None = None,
                      ) -> AsyncConnection | SendResult | None: ...
    def end(self, conn: AsyncConnection, *, lost: bool) -> None: ...
    async def quit(self, conns: list[AsyncConnection]) -> None: ...
    def broke_fresh(self, f: Failover, relay: RelayState, failure: SendResult) -> bool: ...


class _Tx:
    """One message on its way through a pump."""

    __slots__ = ("job", "env", "f", "retried", "reused", "flow", "t0", "settled")

    def __init__(self, job: Job, env: Envelope) -> None:
        self.job, self.env = job, env
        self.f = Failover()  # the relays its connections failed on
        self.retried = False  # sent once more after its reused connection broke before its data
        self.reused = False  # its transaction went on a connection that had carried one before
        self.flow: Flow | None = None
        self.t0 = 0.0
        self.settled = False


class Pump:
    """One connection at a time, fed from `source`. `run` returns only when cancelled.

    A pump holds a message only while it has a connection, or is opening one: a pump made to
    wait for a connection at a cap (pick answers None) gives its message back (which wakes a
    parked pump that has a connection) and waits holding nothing, giving up once nothing is
    left to send; so no batch waits on a pump that cannot send."""

    def __init__(self, sender: Opener, source: Source) -> None:
        self.sender, self.source = sender, source
        self.conn: AsyncConnection | None = None
        self._carry: _Tx | None = None  # goes first: its connection broke before its data
        self._open: list[_Tx] = []  # started, not settled: a bug in here must not lose them

    async def run(self) -> None:
        """Cancelled, it leaves its connection to the sender's `aclose` (QUIT)."""
        while True:
            tx: _Tx | None = None
            try:
                tx, self._carry = self._carry or self._take(), None
                if tx is None:
                    await self.source.wait()  # its connection, if any, kept open meanwhile
                    continue
                if self.conn is None:
                    tx = await self._connect(tx)
                if tx is not None:
                    await self._send(tx)
            except asyncio.CancelledError:
                self._settle_all(tx, SendResult("transient",
                                                "the sender closed before the server replied"))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the pump
                self._drop(lost=True)
                self._settle_all(tx, SendResult("transient",
                                                f"send failed: {type(exc).__name__}: {exc}"))
                self._open, self._carry = [], None

    def _settle_all(self, tx: _Tx | None, result: SendResult) -> None:
        """Every message this pump holds, and `tx`, not yet settled: `result`."""
        for t in [*self._open, *([tx] if tx is not None else [])]:
            if not t.settled:
                self._done(t, result)

    async def _connect(self, tx: _Tx) -> _Tx | None:
        """A connection for `tx`: the message to send on it, or None. Made to wait at a cap, the
        pump gives `tx` back to its source first (another pump may send it meanwhile; a carried
        message so given back goes as a new one) and, connected, takes the next one."""
        held = [tx]

        def at_cap() -> None:
            if held:
                t = held.pop()
                t.settled = True  # not by this pump
                self.source.putback(t.job)
        opened = await self.sender.connect(
            tx.f, at_cap=at_cap, still_wanted=lambda: bool(held) or self.source.pending())
        if isinstance(opened, AsyncConnection):
            self.conn = opened
            return held[0] if held else self._take()
        if opened is not None and held:  # no relay to go to: the send's outcome
            self._done(held[0], opened)
        return None

    def _take(self) -> _Tx | None:
        """The next message, composed; one that cannot be is settled here."""
        while (job := self.source.take()) is not None:
            try:
                env = self.sender.envelope_of(job.message)
            except Exception as exc:  # noqa: BLE001 - a composer bug fails this message only
                env = SendResult("permanent", f"message not built: {type(exc).__name__}: {exc}")
            if isinstance(env, Envelope):
                return _Tx(job, env)
            now = time.time()
            self.source.done(job, env, now, now)
        return None

    def _done(self, tx: _Tx, result: SendResult) -> None:
        tx.settled = True
        if tx in self._open:
            self._open.remove(tx)
        now = time.time()
        self.source.done(tx.job, result, tx.t0 or now, now)

    async def _send(self, tx: _Tx) -> None:
        """`tx`, and while its connection may overlap the next, the messages after it."""
        source = self.source
        if source.paced and not await source.turn():
            return self._done(tx, ABANDONED)
        conn = self.conn
        assert conn is not None
        relay = conn.relay
        if relay.limiter is not None:  # this relay's rate: a slot of its schedule first
            await relay.limiter.await_turn()
            if relay.limiter.cancelled:
                return self._done(tx, ABANDONED)
        if not conn.usable or conn is not self.conn:  # closed while it waited for its turn
            self._drop(lost=True)
            self._carry = tx  # nothing was written: on a new connection, at once
            return None
        session = conn.session
        overlap = not source.paced and relay.limiter is None and session.caps.pipelining
        step = self._start(conn, tx)
        inflight: list[tuple[_Tx, int]] = []
        out = b""
        while step is not None:
            cur, (data, n) = step
            out += data
            inflight.append((cur, n))
            step = None
            if (n == FINAL and overlap and conn.usable
                    and session.sent < self.sender.max_per_connection):
                while step is None and (nxt := self._take()) is not None:
                    step = self._start(conn, nxt)
                if step is not None:
                    continue  # the next message's commands go in the same write as this data
            step = await self._round(conn, out, inflight)
            out, inflight = b"", []
        if conn is not self.conn:
            return None  # the connection broke; what was in flight is settled or carried
        if not conn.usable:  # 421: the server is closing the channel
            self._drop(lost=True)
        elif session.sent >= self.sender.max_per_connection:
            self._drop(lost=False)
            await self.sender.quit([conn])
        return None

    def _start(self, conn: AsyncConnection, tx: _Tx) -> tuple[_Tx, tuple[bytes, int]] | None:
        """`tx`'s first step on `conn`; None when the session refuses it before any byte."""
        tx.reused = conn.session.sent > 0
        tx.t0 = time.time()
        tx.flow = conn.session.transaction(tx.env)
        self._open.append(tx)
        try:
            step = next(tx.flow)
        except StopIteration as stop:
            self._done(tx, stop.value)
            return None
        except Exception as exc:  # noqa: BLE001 - nothing written yet: this message only
            self._done(tx, SendResult("permanent", f"message not sendable: {type(exc).__name__}: "
                                      f"{exc}"))
            return None
        return tx, step

    async def _round(self, conn: AsyncConnection, out: bytes,
                     inflight: list[tuple[_Tx, int]]) -> tuple[_Tx, tuple[bytes, int]] | None:
        """Write `out`, read the replies of every transaction in flight (one read), and hand
        each its own; the step of the one that goes on (at most one: the last), if any. A
        server that answered part and then closed leaves the rest as wire.CLOSED placeholders:
        a transaction that got nothing but those broke with the connection, it was not refused
        (one without its data written goes again at once: nothing of it was delivered)."""
        conn.write(out)  # with the other pumps' writes of this round (WriteBatch)
        relay = conn.relay
        try:
            replies = await conn.expect(sum(1 if n == FINAL else n for _, n in inflight))
        except OSError as exc:
            self._drop(lost=True)
            for tx, n in inflight:
                self._broke(tx, relay, connection_result(exc, "connection lost"),
                            sent_data=n == FINAL)
            return None
        step, i, closed = None, 0, False
        for tx, n in inflight:
            k = 1 if n == FINAL else n
            mine = replies[i:i + k]
            i += k
            if mine[0] is CLOSED:  # nothing came for it (a refusal that came is its own)
                if not closed:
                    closed = True
                    self._drop(lost=True)
                self._broke(tx, relay, connection_result(
                    ConnectionResetError("the server closed the connection"), "connection lost"),
                    sent_data=n == FINAL)
                continue
            assert tx.flow is not None
            try:
                step = tx, tx.flow.send(mine)
            except StopIteration as stop:
                self._done(tx, stop.value)
        return None if closed else step

    def _broke(self, tx: _Tx, relay: RelayState, failure: SendResult, *, sent_data: bool) -> None:
        if not sent_data and tx.reused and not tx.retried:
            tx.retried = True  # not delivered: once more, at once, on a new connection
        elif sent_data or tx.reused or not self.sender.broke_fresh(tx.f, relay, failure):
            return self._done(tx, failure)
        self._open.remove(tx)  # fresh and broken before its data: to another relay, at once
        self._carry = tx

    def _drop(self, *, lost: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.sender.end(conn, lost=lost)


class Call:
    __slots__ = ("message", "future")

    def __init__(self, message: Any, future: asyncio.Future[SendResult]) -> None:
        self.message, self.future = message, future


class Calls:
    """A source of single calls (AsyncSmtpSender.asend): one queued message per awaiting
    coroutine, its outcome handed to the coroutine's future."""

    paced = False

    def __init__(self) -> None:
        self.queue: deque[Call] = deque()
        self.idle: deque[asyncio.Future[None]] = deque()

    def pending(self) -> bool:
        while self.queue and self.queue[0].future.done():  # callers cancelled: not sent
            self.queue.popleft()
        return bool(self.queue)

    def putback(self, job: Call) -> None:
        self.queue.appendleft(job)
        self.wake()

    def take(self) -> Call | None:
        while self.queue:
            call = self.queue.popleft()
            if not call.future.done():  # its caller was cancelled: not sent
                return call
        return None

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.idle.append(fut)
        await fut

    async def turn(self) -> bool:
        return True

    def wake(self) -> bool:
        """Wake one parked pump; False when none was parked."""
        return wake_one(self.idle)

    def done(self, job: Call, result: SendResult, t0: float, t1: float) -> None:
        if not job.future.done():
            job.future.set_result(result)


def wake_one(waiters: deque[asyncio.Future[None]]) -> bool:
    """Wake the first of `waiters` still waiting; False when none was."""
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return True
    return False
