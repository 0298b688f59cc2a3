"""A local SMTP sink on aiosmtpd, for trying bulkmail without sending real mail, and for tests.

It listens on loopback, accepts (optionally after a `delay`, as a real server scanning and
queueing takes tens of milliseconds), counts and (optionally) keeps or stores every message, counts
connections, RSETs and messages per connection, and can refuse a chosen share of recipients:
`fail_5xx` of them are refused for good (550), `fail_4xx` of them are refused with a transient
421 on their first `transient_times` attempts and accepted afterwards. Who is refused is a pure
function of the address and the seed (`fate()`), so a test can predict it. A 421 also closes the
connection, as a real server does.

`scripts/smtp_sink.py` is the command-line wrapper.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

Fate = Literal["4xx", "5xx"] | None
TlsMode = Literal["none", "starttls", "ssl"]


def fate(address: str, *, fail_4xx: float, fail_5xx: float, seed: int = 0) -> Fate:
    """How the sink treats `address`: '5xx' refused for good, '4xx' refused for a while, None
    accepted. A stable hash of (seed, lower-cased address), the same in every process."""
    if not (fail_4xx or fail_5xx):
        return None
    digest = hashlib.blake2b(f"{seed}:{address.lower()}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < fail_5xx:
        return "5xx"
    if u < fail_5xx + fail_4xx:
        return "4xx"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the sink keeps it across restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Received:
    connection: int  # the sink's number for the connection that carried it (1, 2, ...)
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool = False  # the session was encrypted (STARTTLS or implicit TLS)
    authenticated: bool = False

    def message(self) -> EmailMessage:
        # Wire line ends (CRLF) become local ones, as a mail client stores a received message.
        parsed = message_from_bytes(self.data.replace(b"\r\n", b"\n"), policy=email_policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class SinkStats:
    """Counters, updated on the sink's event-loop thread (plain ints: reads from other threads
    see a recent value)."""

    connections: int = 0  # client connections (counted at their first EHLO/HELO)
    messages: int = 0
    rsets: int = 0
    refused_4xx: int = 0
    refused_5xx: int = 0
    auth_failures: int = 0
    per_connection: Counter[int] = field(default_factory=Counter)  # messages per connection


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP protocol (one instance per connection) that reports to the sink."""

    def __init__(self, handler: Any, *, sink: Sink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sink = sink
        self.number = 0
        self.counted = False
        self.raw_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS with the TLS transport: count the first only.
        first = self.raw_transport is None
        super().connection_made(transport)
        if first:
            self.raw_transport = transport
            self.number = self.sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._closed(self)
        super().connection_lost(error)


class _Controller(Controller):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(sink.handler, **kwargs)

    def factory(self) -> _SinkSMTP:
        return _SinkSMTP(self.handler, sink=self.sink, **self.SMTP_kwargs)


class SinkHandler:
    """aiosmtpd handler hooks: decide each recipient's fate, keep what was accepted."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._tries: Counter[str] = Counter()

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.sink._greeted(server)
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self.sink._greeted(server)
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.sink.stats.rsets += 1
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        s = self.sink
        verdict = fate(address, fail_4xx=s.fail_4xx, fail_5xx=s.fail_5xx, seed=s.seed)
        if verdict == "5xx":
            s.stats.refused_5xx += 1
            return s.reply_5xx
        if verdict == "4xx":
            key = address.lower()
            self._tries[key] += 1
            if self._tries[key] <= s.transient_times:
                s.stats.refused_4xx += 1
                if s.reply_4xx.startswith("421"):
                    # 421 means "closing the channel": close it once the reply is written.
                    server.loop.call_soon(_close, server)
                return s.reply_4xx
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        s = self.sink
        if s.delay:
            await asyncio.sleep(s.delay)  # a real server's time to scan and queue a message
        number = getattr(server, "number", 0)
        data = bytes(envelope.original_content or envelope.content or b"")
        s.stats.messages += 1
        s.stats.per_connection[number] += 1
        if s.keep:
            s.received.append(Received(number, str(envelope.mail_from),
                                       tuple(envelope.rcpt_tos), data,
                                       tls=session.ssl is not None or s.tls == "ssl",
                                       authenticated=bool(session.authenticated)))
        if s.store_dir:
            path = os.path.join(s.store_dir, f"{s.stats.messages:09d}.eml")
            with open(path, "wb") as f:
                f.write(data)
        return "250 2.0.0 OK: queued"


def _close(server: Any) -> None:
    if server.transport is not None:
        server.transport.close()


class Sink:
    """A running aiosmtpd sink. `start()`/`stop()` may be called repeatedly (the port is kept),
    so a test can take the server away in the middle of a run and bring it back."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, fail_4xx: float = 0.0,
                 fail_5xx: float = 0.0, transient_times: int = 1, seed: int = 0,
                 keep: bool = True, store_dir: str | None = None, delay: float = 0.0,
                 tls: TlsMode = "none",
                 tls_context: ssl.SSLContext | None = None,
                 auth: dict[str, str] | None = None,
                 reply_4xx: str = "421 4.7.0 Try again later (bulkmail sink)",
                 reply_5xx: str = "550 5.1.1 Mailbox unavailable (bulkmail sink)",
                 handler: Callable[[Sink], Any] = SinkHandler) -> None:
        if not (0.0 <= fail_4xx <= 1.0 and 0.0 <= fail_5xx <= 1.0 and fail_4xx + fail_5xx <= 1.0):
            raise ValueError("fail_4xx and fail_5xx must be shares in [0, 1] adding up to <= 1")
        if tls != "none" and tls_context is None:
            raise ValueError(f"tls={tls!r} needs a server tls_context")
        self.host = host
        self.port = port or free_port(host)
        self.fail_4xx, self.fail_5xx = fail_4xx, fail_5xx
        self.transient_times = transient_times
        self.seed = seed
        self.keep = keep
        self.delay = delay
        self.store_dir = store_dir
        if store_dir:
            os.makedirs(store_dir, exist_ok=True)
        self.tls = tls
        self.tls_context = tls_context
        self.auth = auth
        self.reply_4xx, self.reply_5xx = reply_4xx, reply_5xx
        self.stats = SinkStats()
        self.received: list[Received] = []
        self.handler = handler(self)
        self._live: set[_SinkSMTP] = set()
        self._lock = threading.Lock()
        self._controller: _Controller | None = None
        self._numbers = 0

    # -- lifecycle
    def start(self) -> Sink:
        kwargs: dict[str, Any] = dict(hostname=self.host, port=self.port)
        if self.tls == "ssl":
            kwargs["ssl_context"] = self.tls_context
        elif self.tls == "starttls":
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        if self.auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=self.tls != "none")
        controller = _Controller(self, **kwargs)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (as a crashed server would)."""
        controller = self._controller
        if controller is None:
            return
        self._controller = None
        self.drop_connections()
        controller.stop()

    def drop_connections(self) -> None:
        """Abort every open connection now; clients see a reset on their next command."""
        controller = self._controller
        with self._lock:
            live = list(self._live)
        if controller is None:
            return

        done = threading.Event()

        def abort() -> None:
            for p in live:
                t = p.raw_transport
                if t is not None and not t.is_closing():
                    t.abort()  # type: ignore[attr-defined]
            done.set()
        controller.loop.call_soon_threadsafe(abort)
        done.wait(5)

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Sink:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- views
    def messages_to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]

    # -- hooks called from the protocol (loop thread)
    def _opened(self, protocol: _SinkSMTP) -> int:
        with self._lock:
            self._live.add(protocol)
            self._numbers += 1
            return self._numbers

    def _greeted(self, protocol: Any) -> None:
        # A client connection is counted at its first EHLO/HELO: Controller.start() opens a
        # probe connection of its own that only reads the banner, and that one is not a client.
        if not getattr(protocol, "counted", True):
            protocol.counted = True
            self.stats.connections += 1

    def _closed(self, protocol: _SinkSMTP) -> None:
        with self._lock:
            self._live.discard(protocol)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = False
        if isinstance(auth_data, LoginPassword) and self.auth is not None:
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            ok = user in self.auth and self.auth[user] == password
        if not ok:
            self.stats.auth_failures += 1
        # handled=False: aiosmtpd itself answers 535 on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
