"""Real SMTP senders on bulkmail's own client (wire.py): `SmtpSender` (a blocking connection per
sending thread, `SyncConnection` below) and `AsyncSmtpSender` (a pool of `AsyncConnection`s shared
by the event loop's coroutines, each carrying one transaction at a time, or two overlapping: the
next one's commands may follow the previous one's data).

Connection discipline, the same in both:
- a connection is reused for up to `max_per_connection` messages, with no RSET between
  successful transactions when the server offers PIPELINING (lock-step servers get an RSET
  before each reuse: wire.Session.lockstep_rset); then it is closed with QUIT;
- a connection that broke before a message's data was written (a server that dropped an idle
  connection, say) cannot have delivered it: the message goes out at once on a new connection
  (counted in `reconnects`);
- a connection error after the data was written fails that message only, as transient (the
  engine retries it after a backoff), and the connection is thrown away, so it never poisons
  the next send;
- reply codes: 4xx transient, 5xx permanent, the server's text is the result's error; a 421
  also closes the connection.

The password is read from the environment variable named by `SmtpConfig.password_env`, here,
inside the sender actor: it never travels in a config, a Ray task argument, the ledger, the
report or a log line, and no error text carries what the client wrote.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import threading
from collections import deque
from typing import Any

from ..compose import ComposeError, Composer, Envelope
from ..config import SendConfig, SmtpConfig
from ..errors import UsageError
from ..messages import Message
from . import wire
from .base import SendResult
from .wire import AsyncConnection, BaseConnection, ConnectionLost, NotOffered, ReplyError, reply_result

__all__ = ["AsyncSmtpSender", "SmtpSender", "SyncConnection", "connection_result", "make_smtp_sender",
           "preflight", "reply_result", "tls_context"]
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, ReplyError, NotOffered)


def tls_context(smtp: SmtpConfig) -> ssl.SSLContext | None:
    if smtp.tls == "none":
        return None
    # Certificates are verified (hostname included); `ca_file` adds a CA to trust (a private
    # or test CA) on top of the system's.
    ctx = ssl.create_default_context()
    if smtp.ca_file:
        ctx.load_verify_locations(cafile=smtp.ca_file)
    return ctx


def connection_result(exc: BaseException, where: str) -> SendResult:
    detail = wire.one_line(exc) or type(exc).__name__
    return SendResult("transient", f"{where}: {type(exc).__name__}: {detail}")


def connect_result(exc: BaseException) -> SendResult:
    """Opening a connection failed: a refusal (greeting, STARTTLS, AUTH), a missing extension
    (never sent anyway: permanent) or a connection error (refused, reset, timeout, TLS)."""
    if isinstance(exc, ReplyError):
        return reply_result(exc.code, exc.text, "connect")
    if isinstance(exc, NotOffered):
        return SendResult("permanent", f"connect: {exc}")
    return connection_result(exc, "connect")


class SyncConnection(BaseConnection):
    """wire's blocking driver (the thread engine: each sending thread keeps its own)."""

    sock: socket.socket

    @classmethod
    def open(cls, smtp: SmtpConfig, *, ehlo: str, context: ssl.SSLContext | None = None,
             password: str | None = None, mechanisms: tuple[str, ...] = wire.AUTH_ORDER) -> SyncConnection:
        """Connect, EHLO, STARTTLS, AUTH; raises OSError, ReplyError or NotOffered."""
        conn = cls(smtp, context)
        conn.sock = socket.create_connection((smtp.host, smtp.port), timeout=smtp.timeout)
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if smtp.tls == "ssl" and context is not None:
                conn.sock = context.wrap_socket(conn.sock, server_hostname=smtp.host)
            conn._run(conn.session.handshake(ehlo, starttls=smtp.tls == "starttls", user=smtp.user,
                                             password=password or "", mechanisms=mechanisms))
            # From now on a blocking socket whose timeouts the kernel keeps (SO_RCVTIMEO and
            # SO_SNDTIMEO): one system call, one GIL hand-off, per read or write, where a Python
            # socket timeout adds a poll() before each.
            tv = struct.pack("ll", int(smtp.timeout), int(smtp.timeout % 1 * 1e6))
            conn.sock.settimeout(None)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except BaseException as exc:
            conn.sock.close()
            raise (exc.cause if isinstance(exc, ConnectionLost) else exc) from None
        return conn

    def _read(self, n: int) -> list[wire.Reply]:
        p = self.parser
        while len(p.ready) < n:
            data = self.sock.recv(65536)
            if not data:
                self._exc = ConnectionResetError("the server closed the connection")
                if p.ready:  # replies came before the close: the missing ones are 421s
                    return p.take(n)
                raise self._exc
            p.feed(data)
        return p.take(n)

    def _run(self, flow: wire.Flow) -> Any:
        n = 0
        try:
            out, n = next(flow)
            while True:
                if out:
                    self.sock.sendall(out)
                if n == wire.TLS:
                    if self.parser.pending or self._ctx is None:
                        raise wire.ProtocolError("unexpected bytes after the STARTTLS reply")
                    self.sock = self._ctx.wrap_socket(self.sock, server_hostname=self.smtp.host)
                    out, n = flow.send([])
                else:
                    out, n = flow.send(self._read(1 if n == wire.FINAL else n))
        except StopIteration as stop:
            return stop.value
        except OSError as exc:  # reset, closed, timeout, TLS, ProtocolError
            if isinstance(exc, (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                exc = TimeoutError(f"no reply from the server within {self.smtp.timeout:g} s")
            raise self._lost(exc, n) from exc

    def send(self, env: Envelope) -> SendResult:
        """One message; raises ConnectionLost when the connection breaks."""
        if self.parser.pending:  # a reply nobody asked for (a 421 while idle, say)
            raise self._lost(wire.ProtocolError("unsolicited reply on an idle connection"), 0)
        result: SendResult = self._run(self.session.transaction(env))
        return result

    def close(self) -> None:
        """QUIT (waiting a moment for its reply), then close."""
        if self.usable:
            try:
                self.sock.settimeout(min(self.smtp.timeout, 2.0))
                self.sock.sendall(b"QUIT\r\n")
                self._read(1)
            except OSError:
                pass
        self._exc = self._exc or ConnectionAbortedError("closed by bulkmail")
        self.sock.close()


class _Counters:
    """What both SMTP senders share: their settings, TLS context, EHLO name and counters."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None,
                 local_hostname: str | None) -> None:
        self._lock = threading.Lock()
        self.connections_opened = 0
        self.reconnects = 0
        self.smtp = smtp
        self.composer = composer
        self._password = password
        self._ctx = tls_context(smtp)
        # EHLO name: the From domain, not socket.getfqdn() (a DNS lookup per connection).
        self._ehlo = local_hostname or composer.envelope_from.rpartition("@")[2] or "localhost"

    def opened(self) -> None:
        with self._lock:
            self.connections_opened += 1

    def reconnected(self) -> None:
        with self._lock:
            self.reconnects += 1

    def _envelope(self, message: Message) -> Envelope | SendResult:
        try:
            return self.composer.envelope(message)
        except ComposeError as exc:
            return SendResult("permanent", f"message not built: {exc}")


class SmtpSender(_Counters):
    """Thread-safe: each sending thread keeps its own connection (`threading.local`)."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname)
        self._local = threading.local()
        self._all: set[SyncConnection] = set()

    def _drop(self, conn: SyncConnection, *, lost: bool) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._all.discard(conn)
        if lost:
            self.reconnected()
        conn.close()  # QUIT first if the connection is still usable

    def send(self, message: Message) -> SendResult:
        env = self._envelope(message)
        return env if isinstance(env, SendResult) else self.send_envelope(env)

    def send_envelope(self, env: Envelope) -> SendResult:
        retried = False
        while True:
            conn: SyncConnection | None = getattr(self._local, "conn", None)
            if conn is not None and conn.session.sent >= self.smtp.max_per_connection:
                self._drop(conn, lost=False)
                conn = None
            if conn is None:
                try:
                    conn = SyncConnection.open(self.smtp, ehlo=self._ehlo, context=self._ctx,
                                               password=self._password)
                except CONNECT_ERRORS as exc:
                    return connect_result(exc)
                self.opened()
                self._local.conn = conn
                with self._lock:
                    self._all.add(conn)
            reused = conn.session.sent > 0
            try:
                result = conn.send(env)
            except ConnectionLost as lost:
                self._drop(conn, lost=True)
                if lost.retry_safe and reused and not retried:
                    retried = True  # not delivered: once more, at once, on a new connection
                    continue
                return connection_result(lost.cause, "connection lost")
            if not conn.usable:  # 421: the server is closing the channel
                self._drop(conn, lost=True)
            return result

    def close(self) -> None:
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            self._drop(conn, lost=False)


class AsyncSmtpSender(_Counters):
    """For `--mode async`: the engine's coroutines share a pool of connections. A coroutine takes
    an idle one (or opens one), sends, and the connection is back in the pool as soon as its
    data is written, so the next message's commands follow it in the same flight. At most
    `max_connections` are open (None: one per concurrent send at most)."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None, max_connections: int | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname)
        self.max_connections = max_connections
        self._idle: list[AsyncConnection] = []
        self._live = 0  # open or opening
        self._wanted: deque[asyncio.Future[None]] = deque()  # waiting for a connection (at the cap)

    def _wake(self) -> None:
        while self._wanted:
            fut = self._wanted.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _free(self, conn: AsyncConnection) -> None:
        """wire's `on_free`: the connection may take the next transaction."""
        if not conn.usable:
            return  # the sending coroutine ends it
        if conn.session.sent >= self.smtp.max_per_connection:
            conn.retiring = True
            return
        self._idle.append(conn)
        self._wake()

    def _end(self, conn: AsyncConnection, *, lost: bool) -> bool:
        if conn.ended:
            return False
        conn.ended = True
        self._live -= 1
        if lost:
            self.reconnected()
            conn.abort()
        self._wake()
        return True

    async def _acquire(self, fresh: bool) -> AsyncConnection:
        while True:
            while self._idle and not fresh:
                conn = self._idle.pop()
                if conn.usable:
                    return conn
                self._end(conn, lost=True)  # died while idle
            if self.max_connections is None or self._live < self.max_connections:
                break
            fut = asyncio.get_running_loop().create_future()
            self._wanted.append(fut)
            await fut
        self._live += 1
        try:
            conn = await AsyncConnection.open(self.smtp, ehlo=self._ehlo, context=self._ctx,
                                              password=self._password, on_free=self._free)
        except BaseException:
            self._live -= 1
            self._wake()
            raise
        self.opened()
        return conn

    async def asend(self, message: Message) -> SendResult:
        env = self._envelope(message)
        return env if isinstance(env, SendResult) else await self.asend_envelope(env)

    async def asend_envelope(self, env: Envelope) -> SendResult:
        retried = False
        while True:
            try:
                conn = await self._acquire(retried)
            except CONNECT_ERRORS as exc:
                return connect_result(exc)
            reused = conn.session.sent > 0
            try:
                result = await conn.send(env)
            except ConnectionLost as lost:
                self._end(conn, lost=True)
                if lost.retry_safe and reused and not retried:
                    retried = True  # not delivered: once more, at once, on a new connection
                    continue
                return connection_result(lost.cause, "connection lost")
            if not conn.usable:  # 421: the server is closing the channel
                self._end(conn, lost=True)
            elif conn.retiring and self._end(conn, lost=False):
                await self._quit([conn])
            return result

    async def _quit(self, conns: list[AsyncConnection]) -> None:
        """QUIT, a moment for the replies, then close."""
        futs = []
        for c in conns:
            if c.usable:
                c.write(b"QUIT\r\n")
                futs.append(c.expect(1))
        if futs:
            await asyncio.wait(futs, timeout=min(self.smtp.timeout, 2.0))
            for f in futs:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: a connection reset after QUIT is no news
        for c in conns:
            c.abort()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._end(conn, lost=False)
        await self._quit(idle)

    def close(self) -> None:
        """Drop the idle connections at once (`aclose`, on the loop, says QUIT first)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.abort()
            except RuntimeError:  # its event loop is closed already
                pass


def preflight(smtp: SmtpConfig) -> None:
    """Driver-side checks before Ray starts (the actors read the password themselves)."""
    if smtp.user and not os.environ.get(smtp.password_env):
        raise UsageError(f"--smtp-user {smtp.user}: set the password in ${smtp.password_env} "
                         "(it is never taken from a flag)")
    if smtp.ca_file and not os.path.isfile(smtp.ca_file):
        raise UsageError(f"--smtp-ca-file {smtp.ca_file}: no such file")
    if smtp.tls == "none" and smtp.user:
        raise UsageError("--smtp-user with --smtp-tls none would send the password in clear "
                         "text; use --smtp-tls starttls or ssl")


def make_smtp_sender(config: SendConfig, *, campaign: str) -> SmtpSender | AsyncSmtpSender:
    """Called inside each sender actor: reads the templates and the password there."""
    smtp = config.smtp
    password = os.environ.get(smtp.password_env) if smtp.user else None
    composer = Composer(config.message, campaign=campaign)
    if config.mode == "async":
        return AsyncSmtpSender(smtp, composer, password=password)
    return SmtpSender(smtp, composer, password=password)
