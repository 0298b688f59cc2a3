"""Real SMTP senders: `SmtpSender` (smtplib, one pooled connection per sending thread) and
`AsyncSmtpSender` (aiosmtplib, a pool of idle connections shared by the event loop's workers).

Connection discipline, the same in both:
- a connection is reused for up to `max_per_connection` messages, with RSET before each reuse;
  a failed RSET means the server dropped it: it is replaced at once and the message goes out
  on the new one (counted in `reconnects`);
- a connection error while a message is in flight fails that message only, as transient (the
  engine retries it after a backoff), and the connection is thrown away, so it never poisons
  the next send;
- reply codes: 4xx transient, 5xx permanent; the server's reply text is the result's error.

The password is read from the environment variable named by `SmtpConfig.password_env`, here,
inside the sender actor: it never travels in a config, a Ray task argument, the ledger, the
report or a log line.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
import threading
from typing import Any

import aiosmtplib

from .config import SendConfig, SmtpConfig
from .errors import UsageError
from .messages import Message
from .senders import SENT, Outcome, SendResult
from .templates import ComposeError, Composer, Envelope


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())  # one line: multi-line replies are joined


def reply_result(code: int, text: Any, where: str = "") -> SendResult:
    """A server's refusal as a result: 4xx transient, 5xx (and anything else) permanent."""
    prefix = f"{where}: " if where else ""
    status: Outcome = "transient" if 400 <= code < 500 else "permanent"
    return SendResult(status, f"{prefix}{code} {_text(text)}".strip())


def connection_result(exc: BaseException, where: str) -> SendResult:
    detail = _text(exc) or type(exc).__name__
    return SendResult("transient", f"{where}: {type(exc).__name__}: {detail}")


def tls_context(smtp: SmtpConfig) -> ssl.SSLContext | None:
    if smtp.tls == "none":
        return None
    # Certificates are verified (hostname included); `ca_file` adds a CA to trust (a private
    # or test CA) on top of the system's.
    ctx = ssl.create_default_context()
    if smtp.ca_file:
        ctx.load_verify_locations(cafile=smtp.ca_file)
    return ctx


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


class _Conn:
    __slots__ = ("client", "sent")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent = 0  # transactions started on this connection


class SmtpSender(_Counters):
    """Thread-safe: each sending thread keeps its own connection (`threading.local`)."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname)
        self._local = threading.local()
        self._all: set[_Conn] = set()

    def _open(self) -> _Conn:
        s = self.smtp
        client: smtplib.SMTP
        if s.tls == "ssl":
            client = smtplib.SMTP_SSL(s.host, s.port, local_hostname=self._ehlo,
                                      timeout=s.timeout, context=self._ctx)
        else:
            client = smtplib.SMTP(s.host, s.port, local_hostname=self._ehlo, timeout=s.timeout)
        try:
            client.ehlo()
            if s.tls == "starttls":
                client.starttls(context=self._ctx)
                client.ehlo()
            if s.user:
                client.login(s.user, self._password or "")
        except BaseException:
            client.close()
            raise
        conn = _Conn(client)
        self.opened()
        with self._lock:
            self._all.add(conn)
        return conn

    def _drop(self, conn: _Conn, *, polite: bool = False) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._all.discard(conn)
        try:
            if polite:
                conn.client.quit()
            else:
                conn.client.close()
        except (smtplib.SMTPException, OSError):
            conn.client.close()

    def _connection(self) -> _Conn:
        """This thread's connection, fresh or checked with RSET."""
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sent >= self.smtp.max_per_connection:
            self._drop(conn, polite=True)
            conn = None
        if conn is not None and conn.sent:
            try:
                code, _ = conn.client.rset()
                healthy = code == 250
            except (smtplib.SMTPException, OSError):
                healthy = False
            if not healthy:
                self._drop(conn)
                self.reconnected()
                conn = None
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    def send(self, message: Message) -> SendResult:
        try:
            env = self.composer.envelope(message)
        except ComposeError as exc:
            return SendResult("permanent", f"message not built: {exc}")
        try:
            conn = self._connection()
        except smtplib.SMTPResponseException as exc:  # greeting, STARTTLS or AUTH refused
            return reply_result(exc.smtp_code, exc.smtp_error, "connect")
        except smtplib.SMTPNotSupportedError as exc:  # no STARTTLS / no AUTH: never send anyway
            return SendResult("permanent", f"connect: {exc}")
        except (smtplib.SMTPException, OSError) as exc:  # refused, reset, timeout, TLS
            return connection_result(exc, "connect")
        return self._transaction(conn, env)

    def _transaction(self, conn: _Conn, env: Envelope) -> SendResult:
        client = conn.client
        options: list[str] = []
        if env.smtputf8:
            if not client.has_extn("smtputf8"):
                return SendResult("permanent", "server does not offer SMTPUTF8, needed for "
                                  f"{env.recipient!r}")
            options.append("SMTPUTF8")
        conn.sent += 1
        try:
            client.sendmail(env.sender, [env.recipient], env.data, mail_options=options)
            return SENT
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            result = reply_result(code, text)
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused
            result = reply_result(exc.smtp_code, exc.smtp_error)
        except (smtplib.SMTPException, OSError) as exc:  # disconnected mid-transaction
            self._drop(conn)
            self.reconnected()
            return connection_result(exc, "connection lost")
        if (result.error or "").startswith("421") or client.sock is None:
            # 421: the server is closing the channel (smtplib has already closed it).
            self._drop(conn)
            self.reconnected()
        return result

    def close(self) -> None:
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            self._drop(conn, polite=True)


class AsyncSmtpSender(_Counters):
    """For `--mode async`: the engine's worker coroutines share a pool of idle connections. A
    worker takes one (or opens one), sends, and gives it back, so at most one connection per
    concurrent send is ever open."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname)
        self._idle: list[_Conn] = []

    async def _open(self) -> _Conn:
        s = self.smtp
        client = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, timeout=s.timeout, local_hostname=self._ehlo,
            use_tls=s.tls == "ssl", start_tls=s.tls == "starttls", tls_context=self._ctx,
            username=s.user, password=(self._password or "") if s.user else None)
        await client.connect()
        self.opened()
        return _Conn(client)

    async def _drop(self, conn: _Conn, *, polite: bool = False) -> None:
        try:
            if polite:
                await conn.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            conn.client.close()

    async def _connection(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.sent >= self.smtp.max_per_connection:
                await self._drop(conn, polite=True)
                continue
            try:
                await conn.client.rset()
                return conn
            except (aiosmtplib.SMTPException, OSError):
                await self._drop(conn)
                self.reconnected()
        return await self._open()

    async def asend(self, message: Message) -> SendResult:
        try:
            env = self.composer.envelope(message)
        except ComposeError as exc:
            return SendResult("permanent", f"message not built: {exc}")
        try:
            conn = await self._connection()
        except aiosmtplib.SMTPResponseException as exc:
            return reply_result(exc.code, exc.message, "connect")
        except (OSError, asyncio.TimeoutError) as exc:  # refused, reset, timeout, TLS
            return connection_result(exc, "connect")
        except aiosmtplib.SMTPException as exc:
            # Not a connection error: no STARTTLS or no AUTH offered (aiosmtplib raises a plain
            # SMTPException for those). Retrying cannot help, and sending in clear is no option.
            return SendResult("permanent", f"connect: {exc}")
        client = conn.client
        options: list[str] = []
        if env.smtputf8:
            if not client.supports_extension("smtputf8"):
                self._idle.append(conn)
                return SendResult("permanent", "server does not offer SMTPUTF8, needed for "
                                  f"{env.recipient!r}")
            options.append("SMTPUTF8")
        conn.sent += 1
        try:
            await client.sendmail(env.sender, [env.recipient], env.data, mail_options=options)
            result = SENT
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            result = reply_result(first.code, first.message)
        except aiosmtplib.SMTPResponseException as exc:
            result = reply_result(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            await self._drop(conn)
            self.reconnected()
            return connection_result(exc, "connection lost")
        if (result.error or "").startswith("421") or not client.is_connected:
            await self._drop(conn)
            self.reconnected()
        else:
            self._idle.append(conn)
        return result

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn, polite=True)

    def close(self) -> None:
        for conn in self._idle:
            conn.client.close()
        self._idle = []


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


def make_smtp_sender(config: SendConfig) -> SmtpSender | AsyncSmtpSender:
    """Called inside each sender actor: reads the templates and the password there."""
    smtp = config.smtp
    password = os.environ.get(smtp.password_env) if smtp.user else None
    composer = Composer(config.message)
    if config.mode == "async":
        return AsyncSmtpSender(smtp, composer, password=password)
    return SmtpSender(smtp, composer, password=password)
