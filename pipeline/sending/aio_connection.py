"""wire's asyncio driver, `AsyncConnection`: the async sender's connections (smtp.AsyncSmtpSender,
each driven by a pump, pump.py), over the same sans-IO protocol code as the blocking driver; and
`WriteBatch`, which flushes the writes of one round of the event loop together."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

from ..compose import Envelope
from ..config import SmtpConfig
from .base import SendResult
from .wire import (
    AUTH_ORDER,
    FINAL,
    TLS,
    BaseConnection,
    ConnectionLost,
    Flow,
    ProtocolError,
    Reply,
)

__all__ = ["AsyncConnection", "WriteBatch"]


class AsyncConnection(BaseConnection, asyncio.Protocol):
    """A connection on the event loop. Reads (`expect`) are answered in order, so transactions
    may overlap on it (pump.py drives them); `send` runs one alone."""

    ended = False  # for the sender: its end is accounted for

    def __init__(self, smtp: SmtpConfig, ctx: ssl.SSLContext | None,
                 batch: WriteBatch | None = None) -> None:
        super().__init__(smtp, ctx)
        self._batch = batch or WriteBatch()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._waiters: deque[tuple[int, asyncio.Future[list[Reply]]]] = deque()
        self._out: list[bytes] = []  # written in this round of the loop, not yet flushed
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0  # loop time of the last bytes received (or of the first waiter)

    @classmethod
    async def open(cls, smtp: SmtpConfig, *, ehlo: str, context: ssl.SSLContext | None = None,
                   password: str | None = None, mechanisms: tuple[str, ...] = AUTH_ORDER,
                   batch: WriteBatch | None = None) -> AsyncConnection:
        """Connect, EHLO, STARTTLS, AUTH; raises OSError, ReplyError or NotOffered. `batch`:
        the sender's, so that its connections' writes go out together."""
        conn = cls(smtp, context, batch)
        implicit = conn._ctx if smtp.tls == "ssl" else None
        await asyncio.wait_for(conn._loop.create_connection(
            lambda: conn, smtp.host, smtp.port, ssl=implicit,
            server_hostname=smtp.host if implicit else None,
            ssl_handshake_timeout=smtp.timeout if implicit else None), smtp.timeout)
        try:
            await conn._run(conn.session.handshake(ehlo, starttls=smtp.tls == "starttls", user=smtp.user,
                                                   password=password or "", mechanisms=mechanisms))
        except BaseException as exc:
            conn.abort()
            raise (exc.cause if isinstance(exc, ConnectionLost) else exc) from None
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's too; both set TCP_NODELAY

    def data_received(self, data: bytes) -> None:
        p = self.parser
        try:
            p.feed(data)
        except ProtocolError as exc:
            return self.abort(exc)
        self._progress = self._loop.time()
        waiters = self._waiters
        while waiters and len(p.ready) >= waiters[0][0]:
            n, fut = waiters.popleft()
            replies = p.take(n)  # taken even for a cancelled waiter: they are its replies
            if not fut.done():
                fut.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:  # also after the server's EOF
        self._fail(exc if isinstance(exc, OSError) else
                   ConnectionResetError(str(exc or "the server closed the connection")))

    def _fail(self, exc: BaseException) -> None:
        self._exc = self._exc or exc
        partial = bool(self.parser.ready)  # replies came before the close: the first waiter's
        while self._waiters:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            if partial:
                fut.set_result(self.parser.take(n))
            else:
                fut.set_exception(self._exc)
            partial = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expect(self, n: int) -> asyncio.Future[list[Reply]]:
        fut: asyncio.Future[list[Reply]] = self._loop.create_future()
        if self._exc is not None:
            fut.set_exception(self._exc)
        elif not self._waiters and len(self.parser.ready) >= n:
            fut.set_result(self.parser.take(n))
        else:
            if not self._waiters:
                self._progress = self._loop.time()
            self._waiters.append((n, fut))
            if self._timer is None:
                self._timer = self._loop.call_at(self._progress + self.smtp.timeout, self._check)
        return fut

    def _check(self) -> None:  # the read timeout: replies awaited, nothing came for `timeout` s
        self._timer, due = None, self._progress + self.smtp.timeout
        if self._waiters and self._exc is None and self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
        elif self._waiters and self._exc is None:
            self.abort(TimeoutError(f"no reply from the server within {self.smtp.timeout:g} s"))

    async def _run(self, flow: Flow) -> Any:
        n = 0
        try:
            out, n = next(flow)
            while True:
                if self._exc is not None or self._transport is None:
                    raise self._exc or ConnectionResetError("not connected")
                if out:
                    self.write(out)
                if n == TLS:
                    if self.parser.pending or self._ctx is None:
                        raise ProtocolError("unexpected bytes after the STARTTLS reply")
                    tr = await self._loop.start_tls(self._transport, self, self._ctx,
                                                    server_hostname=self.smtp.host,
                                                    ssl_handshake_timeout=self.smtp.timeout)
                    self._transport = cast(asyncio.Transport, tr)
                    out, n = flow.send([])
                else:
                    out, n = flow.send(await self.expect(1 if n == FINAL else n))
        except StopIteration as stop:
            return stop.value
        except OSError as exc:  # reset, closed, timeout, TLS, ProtocolError
            raise self._lost(exc, n) from exc
        except asyncio.CancelledError:  # cut off mid-transaction: the session's state is unknown
            self.abort()
            raise

    async def send(self, env: Envelope) -> SendResult:
        """One message; raises ConnectionLost when the connection breaks."""
        result: SendResult = await self._run(self.session.transaction(env))
        return result

    def abort(self, exc: BaseException | None = None) -> None:
        self._fail(exc or ConnectionAbortedError("closed by bulkmail"))
        if self._transport is not None:
            self._transport.abort()

    def write(self, out: bytes) -> None:
        """Buffered until the loop's current round ends (`WriteBatch`)."""
        if not self._out:
            self._batch.add(self)
        self._out.append(out)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out and self._exc is None and self._transport is not None:
            self._transport.writelines(out)


class WriteBatch:
    """The writes of one round of the event loop, flushed together once the round is over: the
    server's side is woken once for all of them, not once per message. On this machine (a VM,
    where waking a sleeping process costs an inter-processor interrupt) the write system call
    took 41% of the send loop's thread when each message went out at once (py-spy), and the
    client spent 30 µs of kernel time a message against 6 for the raw client, which keeps the
    server busy; flushed per round, 18,700 -> 24,300 messages/s in scripts/bench_send_loop.py
    (docs/ray-notes.md, "Connection pumps"). One per sender, shared by its connections."""

    def __init__(self) -> None:
        self._dirty: list[AsyncConnection] = []

    def add(self, conn: AsyncConnection) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        self._dirty.append(conn)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


async def quit_all(conns: list[AsyncConnection], timeout: float) -> None:
    """QUIT on each usable connection, up to `timeout` for the replies, then close them all."""
    futs = []
    try:
        for c in conns:
            if c.usable:
                c.write(b"QUIT\r\n")
                futs.append(c.expect(1))
        if futs:
            await asyncio.wait(futs, timeout=timeout)
            for f in futs:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: a connection reset after QUIT is no news
    finally:
        for c in conns:
            c.abort()
