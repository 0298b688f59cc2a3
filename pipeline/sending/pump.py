"""Connection pumps: how the async SMTP sender moves messages (no Ray).

One coroutine per connection takes messages from a `Source` (the AsyncEngine's ready queue, or
AsyncSmtpSender.asend's own queue) and runs their transactions over its connection, the
protocol steps coming from wire.Session. With PIPELINING, the moment a message's DATA is
answered 354 its data and "." go out in one write together with the next message's MAIL, RCPT
and DATA, and the replies to both come back together: one write and one read a message, as in
the raw client of scripts/bench_smtp_clients.py. A worker coroutine per send, each awaiting a
connection from a shared pool, cost 54 µs of CPU a message in scripts/bench_send_loop.py, a
pump per connection 46 (docs/ray-notes.md, "Connection pumps").

Delivery rules (the same as the threaded sender's, smtp.py's docstring):
- a connection that broke before a message's data was written cannot have delivered it: the
  message goes out at once on a new connection (once; on another relay if its connection was
  fresh); one that broke after the data fails that message only, as transient (retried later);
- without PIPELINING, or where a rate limit paces each transaction, nothing overlaps: one
  transaction at a time, lock-step as wire.Session says;
- a connection reaches `max_per_connection` transactions, then says QUIT; a 421 closes it.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from ..compose import Envelope
from .base import ABANDONED, SendResult
from .relays import Failover, RelayState, connection_result
from .wire import FINAL, AsyncConnection, Flow


class Job(Protocol):
    message: Any  # a messages.Message to compose, or an Envelope already composed


class Source(Protocol):
    """Where a pump's messages come from, and where their outcomes go."""

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
    async def connect(self, f: Failover) -> AsyncConnection | SendResult: ...
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
    """One connection at a time, fed from `source`. `run` returns only when cancelled."""

    def __init__(self, sender: Opener, source: Source) -> None:
        self.sender, self.source = sender, source
        self.conn: AsyncConnection | None = None
        self._carry: _Tx | None = None  # goes first: its connection broke before its data
        self._open: list[_Tx] = []  # started, not settled: a bug in here must not lose them

    async def run(self) -> None:
        """Cancelled, it leaves its connection to the sender's `aclose` (QUIT)."""
        while True:
            tx = self._carry or self._take()
            self._carry = None
            if tx is None:
                await self.source.wait()
                continue
            try:
                await self._send(tx)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the pump
                self._drop(lost=True)
                failure = SendResult("transient", f"send failed: {type(exc).__name__}: {exc}")
                for t in [*self._open, tx]:
                    if not t.settled:
                        self._done(t, failure)
                self._open, self._carry = [], None

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
        conn = await self._connection(tx)
        if conn is None:
            return
        source, relay, session = self.source, conn.relay, conn.session
        if source.paced and not await source.turn():
            return self._done(tx, ABANDONED)
        if relay.limiter is not None:  # this relay's rate: a slot of its schedule first
            await relay.limiter.await_turn()
            if relay.limiter.cancelled:
                return self._done(tx, ABANDONED)
        overlap = not source.paced and relay.limiter is None and session.caps.pipelining
        step = self._start(conn, tx)
        inflight: list[tuple[_Tx, int]] = []
        out, replies = b"", 0
        while step is not None:
            cur, (data, n) = step
            out += data
            inflight.append((cur, n))
            replies += 1 if n == FINAL else n
            step = None
            if (n == FINAL and overlap and conn.usable
                    and session.sent < self.sender.max_per_connection):
                while step is None and (nxt := self._take()) is not None:
                    step = self._start(conn, nxt)
                if step is not None:
                    continue  # the next message's commands go in the same write as this data
            step = await self._round(conn, out, replies, inflight)
            out, replies, inflight = b"", 0, []
        if conn is not self.conn:
            return  # the connection broke; what was in flight is settled or carried
        if not conn.usable:  # 421: the server is closing the channel
            self._drop(lost=True)
        elif session.sent >= self.sender.max_per_connection:
            self._drop(lost=False)
            await self.sender.quit([conn])

    async def _connection(self, tx: _Tx) -> AsyncConnection | None:
        if self.conn is not None and not self.conn.usable:  # died while idle
            self._drop(lost=True)
        if self.conn is None:
            opened = await self.sender.connect(tx.f)
            if isinstance(opened, SendResult):
                self._done(tx, opened)
                return None
            self.conn = opened
        return self.conn

    def _start(self, conn: AsyncConnection, tx: _Tx) -> tuple[_Tx, tuple[bytes, int]] | None:
        """`tx`'s first step on `conn`; None when the session refuses it before any byte."""
        tx.reused = conn.session.sent > 0
        tx.t0 = time.time()
        tx.flow = conn.session.transaction(tx.env)
        try:
            step = next(tx.flow)
        except StopIteration as stop:
            self._done(tx, stop.value)
            return None
        self._open.append(tx)
        return tx, step

    async def _round(self, conn: AsyncConnection, out: bytes, count: int,
                     inflight: list[tuple[_Tx, int]]) -> tuple[_Tx, tuple[bytes, int]] | None:
        """Write `out`, read the `count` replies of the transactions in flight, and hand each
        its own; the step of the one that goes on (at most one: the last), if any."""
        conn.write(out)  # with the other pumps' writes of this round (wire.WriteBatch)
        try:
            replies = await conn.expect(count)
        except OSError as exc:
            relay = conn.relay
            self._drop(lost=True)
            for tx, n in inflight:
                self._broke(tx, relay, connection_result(exc, "connection lost"),
                            sent_data=n == FINAL)
            return None
        step = None
        for tx, n in inflight:
            k = 1 if n == FINAL else n
            mine, replies = replies[:k], replies[k:]
            assert tx.flow is not None
            try:
                step = tx, tx.flow.send(mine)
            except StopIteration as stop:
                self._done(tx, stop.value)
        return step

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
