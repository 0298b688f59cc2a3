"""A lean SMTP client's sans-IO core (`Session`, `ReplyParser`); its drivers are
`AsyncConnection` (aio_connection.py) and `SyncConnection` (blocking.py). A
handshake or a transaction is a generator yielding steps `(bytes to write, replies to read)`; a
driver only writes, reads and upgrades to TLS, so both run the same protocol code.

PIPELINING (RFC 2920): MAIL + RCPT + DATA in one write, then the dot-stuffed data and "." in one
write; RSET only after a transaction refused before its data, first in the next group. Once a
transaction's data step is reached (`FINAL`), the async sender's pump (pump.py), or a sending
thread (smtp.SmtpSender.send_then), may start the next transaction on the same connection, its
commands in the same write as that data; replies go to the waiting reads in order. Without PIPELINING:
lock-step, RSET before each reuse (`Session.lockstep_rset`). 4xx transient, 5xx permanent, 421
closes. A broken connection raises `ConnectionLost`; `retry_safe`: the data was not written yet.
"""

from __future__ import annotations

import re
import ssl
from base64 import b64encode
from collections.abc import Generator
from typing import Any

from ..compose import Envelope
from ..config import SmtpConfig
from .base import DELIVERED, Outcome, SendResult

Reply = tuple[int, bytes]  # code, text (a multi-line reply's lines joined with b"\n")
Step = tuple[bytes, int]  # what to write, then how many replies to read (or TLS, FINAL)
Flow = Generator[Step, list[Reply], Any]
TLS = -1  # upgrade the connection to TLS now (after STARTTLS's 220)
FINAL = -2  # the data has been written: read its one final reply
CRLF = b"\r\n"
AUTH_ORDER = ("PLAIN", "LOGIN")
CLOSED = (421, b"4.4.2 the server closed the connection before replying")
_BARE_EOL = re.compile(rb"\r\n|\n|\r(?!\n)")


class ReplyError(Exception):
    """The server refused the greeting, EHLO/HELO, STARTTLS or AUTH."""

    def __init__(self, code: int, text: bytes) -> None:
        super().__init__(f"{code} {text.decode('utf-8', 'replace')}")
        self.code, self.text = code, text


class NotOffered(Exception):
    """The server lacks what the configuration requires (STARTTLS, AUTH): never send anyway."""


class ProtocolError(ConnectionError):
    """The server's bytes are not SMTP replies: the connection cannot be trusted any more."""


class ConnectionLost(Exception):
    def __init__(self, cause: BaseException, *, sent_data: bool) -> None:
        super().__init__(str(cause))
        self.cause, self.retry_safe = cause, not sent_data


def one_line(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())  # one line: multi-line replies are joined


def reply_result(code: int, text: Any, where: str = "") -> SendResult:
    """A server's refusal as a result: 4xx transient, 5xx (and anything else) permanent."""
    prefix = f"{where}: " if where else ""
    status: Outcome = "transient" if 400 <= code < 500 else "permanent"
    return SendResult(status, f"{prefix}{code} {one_line(text)}".strip())


def dot_stuffed(data: bytes) -> bytes:
    """The DATA payload: CRLF line ends, a '.' doubled at the start of a line, CRLF.CRLF."""
    crlf = data.count(CRLF)
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _BARE_EOL.sub(CRLF, data)
    data = (b"." if data[:1] == b"." else b"") + data.replace(b"\r\n.", b"\r\n..")
    return data + (b".\r\n" if not data or data.endswith(CRLF) else b"\r\n.\r\n")


class ReplyParser:
    """Bytes in, complete replies out (`ready`)."""

    __slots__ = ("ready", "_buf", "_lines")

    def __init__(self) -> None:
        self.ready: list[Reply] = []
        self._buf = b""
        self._lines: list[bytes] = []

    @property
    def pending(self) -> bool:  # bytes or replies nobody asked for yet
        return bool(self._buf or self._lines or self.ready)

    def feed(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        end = data.rfind(b"\n") + 1
        self._buf = data[end:]
        if len(self._buf) > 65536:
            raise ProtocolError("reply line over 64 KiB")
        for line in (data[:end] if self._buf else data).splitlines():
            sep = line[3:4]
            code = int(line[:3]) if line[:3].isdigit() and sep in (b" ", b"-", b"") else 0
            if not code:
                raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
            if sep == b"-":
                self._lines.append(line[4:])
            elif self._lines:
                self.ready.append((code, b"\n".join([*self._lines, line[4:]])))
                self._lines = []
            else:
                self.ready.append((code, line[4:]))

    def take(self, n: int) -> list[Reply]:
        """`n` replies; when the server closed before all came, the missing ones are CLOSED."""
        out = self.ready[:n]
        del self.ready[:n]
        return out if len(out) == n else out + [CLOSED] * (n - len(out))


class Capabilities:
    """What the EHLO reply offers."""

    def __init__(self, ehlo_text: bytes = b"") -> None:
        lines = ehlo_text.decode("ascii", "replace").upper().replace("=", " ").split("\n")[1:]
        ext = {words[0]: words[1:] for words in map(str.split, lines) if words}
        self.pipelining, self.smtputf8 = "PIPELINING" in ext, "SMTPUTF8" in ext
        self.starttls = "STARTTLS" in ext
        self.auth = set(ext.get("AUTH", ()))
        size = ext.get("SIZE") or ["0"]
        self.size = int(size[0]) if size[0].isdigit() else 0  # 0: no limit announced


class Session:
    """One connection's protocol state; `handshake` and `transaction` are its flows."""

    lockstep_rset = True  # without PIPELINING, RSET before each reuse of the connection

    def __init__(self) -> None:
        self.caps = Capabilities()
        self.needs_rset = False  # a refused transaction left state on the server
        self.sent = 0  # transactions started
        self.closing = False  # a 421 came: the server is closing the channel

    def _refused(self, code: int, text: bytes) -> SendResult:
        self.closing = self.closing or code == 421
        return reply_result(code, text)

    def handshake(self, ehlo: str, *, starttls: bool, user: str | None, password: str,
                  mechanisms: tuple[str, ...] = AUTH_ORDER) -> Flow:
        ((code, text),) = yield b"", 1
        if code != 220:
            raise ReplyError(code, text)
        name = ehlo.encode("ascii", "replace")
        yield from self._ehlo(name)
        if starttls:
            if not self.caps.starttls:
                raise NotOffered("the server does not offer STARTTLS (--smtp-tls starttls): "
                                 "not sending in clear")
            ((code, text),) = yield b"STARTTLS\r\n", 1
            if code != 220:
                raise ReplyError(code, text)
            yield b"", TLS
            yield from self._ehlo(name)
        if user is None:
            return
        offered = [m for m in mechanisms if m in self.caps.auth]
        if not offered:
            what = ", ".join(sorted(self.caps.auth)) or "no AUTH"
            raise NotOffered(f"the server offers {what}; bulkmail speaks AUTH {' or '.join(mechanisms)}")
        u, p = user.encode(), password.encode()
        if offered[0] == "PLAIN":
            ((code, text),) = yield b"AUTH PLAIN " + b64encode(b"\0" + u + b"\0" + p) + CRLF, 1
        else:
            ((code, text),) = yield b"AUTH LOGIN\r\n", 1
            for secret in (u, p):
                if code == 334:
                    ((code, text),) = yield b64encode(secret) + CRLF, 1
        if code != 235:
            raise ReplyError(code, text)

    def _ehlo(self, name: bytes) -> Flow:
        ((code, text),) = yield b"EHLO " + name + CRLF, 1
        if code != 250:  # an old server: HELO, and no extensions
            ((code, text),) = yield b"HELO " + name + CRLF, 1
            if code != 250:
                raise ReplyError(code, text)
            text = b""
        self.caps = Capabilities(text)

    def transaction(self, env: Envelope) -> Flow:
        caps, data = self.caps, env.data
        if env.smtputf8 and not caps.smtputf8:
            return SendResult("permanent", f"server does not offer SMTPUTF8, needed for {env.recipient!r}")
        if not (both := env.sender + env.recipient).isprintable() or "<" in both or ">" in both:
            return SendResult("permanent", f"envelope address unsafe for SMTP: {env.recipient!r}")
        if caps.size and len(data) > caps.size:
            return SendResult("permanent", f"message of {len(data)} bytes is over the server's SIZE "
                              f"limit of {caps.size}")
        opts = (b" SMTPUTF8" if env.smtputf8 else b"") + (b" SIZE=%d" % len(data) if caps.size else b"")
        rset = self.needs_rset or (not caps.pipelining and self.lockstep_rset and self.sent > 0)
        group = (b"RSET\r\n" if rset else b"") + b"MAIL FROM:<%s>%s\r\nRCPT TO:<%s>\r\nDATA\r\n" % (
            env.sender.encode(), opts, env.recipient.encode())
        body = dot_stuffed(data)
        self.sent += 1
        self.needs_rset = True  # until the data phase is reached
        if caps.pipelining:
            replies = yield group, 3 + rset
        else:  # lock-step, up to the first refusal
            replies = []
            for cmd in group.splitlines(keepends=True):
                replies += yield cmd, 1
                if replies[-1][0] >= 400:
                    break
            replies += [CLOSED] * (3 + rset - len(replies))
        if rset and replies[0][0] == 421:
            return self._refused(*replies[0])
        (mc, _), (rc, _), (dc, dt) = replies[-3:]
        if dc == 354:
            if mc < 400 and rc < 400:
                self.needs_rset = False
                ((code, text),) = yield body, FINAL
                return DELIVERED if code // 100 == 2 else self._refused(code, text)
            yield b".\r\n", 1  # DATA accepted though MAIL or RCPT was not: end it empty
        return self._refused(*next((r for r in replies[-3:] if r[0] >= 400), (dc, dt)))


class BaseConnection:  # what both drivers keep
    relay: Any = None  # the sender's note of the relay it goes to (relays.RelayState)

    def __init__(self, smtp: SmtpConfig, ctx: ssl.SSLContext | None) -> None:
        self.smtp, self._ctx = smtp, ctx
        self.session, self.parser = Session(), ReplyParser()
        self._exc: BaseException | None = None  # why the connection is broken

    @property
    def usable(self) -> bool:
        return self._exc is None and not self.session.closing

    def _lost(self, exc: OSError, n: int) -> ConnectionLost:
        self._exc = self._exc or exc
        return ConnectionLost(exc, sent_data=n == FINAL)
