"""wire's blocking driver, `SyncConnection`: the thread engine's connections (each sending thread
keeps its own, smtp.SmtpSender), over the same sans-IO protocol code as the asyncio driver."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from ..compose import Envelope
from ..config import SmtpConfig
from . import wire
from .base import SendResult
from .wire import BaseConnection, ConnectionLost

__all__ = ["Ahead", "SyncConnection"]


class Ahead:
    """A message whose transaction began while the one before it sent its data (chained: its
    commands went in the same write), or its result when it could not begin (`result`). It is
    the sending thread's next message (base.ChainingSender)."""

    __slots__ = ("message", "conn", "flow", "n", "result")

    def __init__(self, message: object, *, conn: SyncConnection | None = None,
                 flow: wire.Flow | None = None, n: int = 0,
                 result: SendResult | None = None) -> None:
        self.message = message
        self.conn = conn  # the connection its commands went out on
        self.flow = flow  # its transaction, waiting for the replies to them
        self.n = n  # how many replies its first step awaits
        self.result = result


def _timeout(exc: OSError, timeout: float) -> OSError:
    """A socket timeout (SO_RCVTIMEO: EAGAIN) as what it means."""
    if isinstance(exc, (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return TimeoutError(f"no reply from the server within {timeout:g} s")
    return exc


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
            raise self._lost(_timeout(exc, self.smtp.timeout), n) from exc

    def send(self, env: Envelope, then: Callable[[], bytes] = bytes) -> SendResult:
        """One message; raises ConnectionLost when the connection breaks. With PIPELINING,
        `then()` may give the next message's commands (`begin`), which go out in the same
        write as this one's data (as the async pumps do, pump.py); their replies are read by
        `go_on`, in the next message's own send (SmtpSender.send_then)."""
        if self.parser.pending:  # a reply nobody asked for (a 421 while idle, say)
            raise self._lost(wire.ProtocolError("unsolicited reply on an idle connection"), 0)
        begun = self.begin(env)
        return begun if isinstance(begun, SendResult) else self._chain(begun[0], *begun[1], then)

    def begin(self, env: Envelope) -> tuple[wire.Flow, wire.Step] | SendResult:
        """`env`'s transaction and its first step (nothing written); its result if the session
        refuses it before any byte."""
        flow = self.session.transaction(env)
        try:
            return flow, next(flow)
        except StopIteration as stop:
            result: SendResult = stop.value
            return result

    def go_on(self, flow: wire.Flow, n: int, then: Callable[[], bytes] = bytes) -> SendResult:
        """A transaction `begin` started and whose first step went out: read its `n` replies,
        then as `send`."""
        return self._chain(flow, b"", n, then)

    def _chain(self, flow: wire.Flow, out: bytes, n: int, then: Callable[[], bytes]) -> SendResult:
        try:
            while True:
                if n == wire.FINAL:
                    out += then()
                if out:
                    self.sock.sendall(out)
                out, n = flow.send(self._read(1 if n == wire.FINAL else n))
        except StopIteration as stop:
            result: SendResult = stop.value
            return result
        except OSError as exc:
            raise self._lost(_timeout(exc, self.smtp.timeout), n) from exc

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
