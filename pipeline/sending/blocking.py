"""wire's blocking driver, `SyncConnection`: the thread engine's connections (each sending thread
keeps its own, smtp.SmtpSender), over the same sans-IO protocol code as the asyncio driver."""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any

from ..compose import Envelope
from ..config import SmtpConfig
from . import wire
from .base import SendResult
from .wire import BaseConnection, ConnectionLost

__all__ = ["SyncConnection"]


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
