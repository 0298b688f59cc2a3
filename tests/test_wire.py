"""bulkmail's own SMTP client (pipeline/sending/wire.py and the senders on it) against real
servers on 127.0.0.1:

- Postfix's smtp-sink (PIPELINING; `-d` dumps every message it accepted to a file);
- aiosmtpd through pipeline.lab.sink.Sink (no PIPELINING: the lock-step case; STARTTLS,
  implicit TLS, AUTH PLAIN and LOGIN);
- `Fake` below, a small asyncio SMTP server that offers PIPELINING and misbehaves on cue:
  refuses chosen recipients, answers 354 after refusing every RCPT, sends 421, drops the
  connection in the middle of a transaction, never answers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from pipeline.compose import Composer, Envelope
from pipeline.config import MessageConfig, SmtpConfig
from pipeline.lab.sink import Sink, free_port
from pipeline.sending import aio_connection, wire
from pipeline.sending.base import SendResult
from pipeline.sending.smtp import AsyncSmtpSender, SmtpSender, SyncConnection

SMTP_SINK = "/usr/sbin/smtp-sink"
FROM = "news@bulkmail.example"
COMPOSER = Composer(MessageConfig(from_addr=f"News <{FROM}>"), campaign="t")


def env(i: int, to: str | None = None, body: bytes = b"Hello.\r\n") -> Envelope:
    to = to or f"user{i}@example.com"
    data = (f"From: <{FROM}>\r\nTo: <{to}>\r\nSubject: m{i}\r\nMessage-ID: <m.{i}@bulkmail.example>\r\n\r\n"
            .encode() + body)
    return Envelope(FROM, to, data, False)


def config(port: int, **kw: Any) -> SmtpConfig:
    return SmtpConfig(host="127.0.0.1", port=port, **{"timeout": 5.0, **kw})


def sync_sender(port: int, **kw: Any) -> SmtpSender:
    return SmtpSender(config(port, **kw), COMPOSER, local_hostname="client.example")


def async_sends(port: int, envs: list[Envelope], *, concurrency: int = 1,
                max_connections: int | None = None, **kw: Any) -> tuple[list[SendResult], AsyncSmtpSender]:
    """Send `envs` through one AsyncSmtpSender with `concurrency` coroutines; results in order."""
    snd = AsyncSmtpSender(config(port, **kw), COMPOSER, local_hostname="client.example",
                          max_connections=max_connections)
    out: list[SendResult | None] = [None] * len(envs)

    async def main() -> None:
        todo = iter(range(len(envs)))

        async def worker() -> None:
            for i in todo:
                out[i] = await snd.asend_envelope(envs[i])
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await snd.aclose()
    asyncio.run(main())
    assert all(r is not None for r in out)
    return [r for r in out if r is not None], snd


# --------------------------------------------------------------------------- the sans-IO core

def test_replies_multi_line_split_anywhere_and_garbage_refused() -> None:
    raw = b"250-smtp.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n354 go\r\n"
    for cut in range(len(raw)):
        p = wire.ReplyParser()
        p.feed(raw[:cut])
        p.feed(raw[cut:])
        assert p.take(2) == [(250, b"smtp.example\nPIPELINING\nSIZE 1000\nAUTH PLAIN LOGIN"), (354, b"go")]
    caps = wire.Capabilities(b"smtp.example\nPIPELINING\nSIZE 1000\nAUTH PLAIN LOGIN\nsmtputf8")
    assert (caps.pipelining, caps.smtputf8, caps.starttls, caps.auth, caps.size) == (
        True, True, False, {"PLAIN", "LOGIN"}, 1000)
    with pytest.raises(wire.ProtocolError):
        wire.ReplyParser().feed(b"HTTP/1.1 400 Bad Request\r\n")
    assert wire.reply_result(421, b"4.7.0 busy\n later") == SendResult("transient", "421 4.7.0 busy later")


def test_dot_stuffing_and_line_ends() -> None:
    assert wire.dot_stuffed(b".a\r\n..b\r\n.\r\nc\r\n") == b"..a\r\n...b\r\n..\r\nc\r\n.\r\n"
    assert wire.dot_stuffed(b"a\nb\r.c") == b"a\r\nb\r\n..c\r\n.\r\n"
    assert wire.dot_stuffed(b"") == b".\r\n"


# --------------------------------------------------------------------------- smtp-sink

@dataclass
class SmtpSink:
    port: int
    dump: Path
    proc: subprocess.Popen[bytes]

    def messages(self) -> list[bytes]:
        """Each dumped message as the client sent it (LF line ends; smtp-sink's own headers off)."""
        out = []
        for path in sorted(self.dump.iterdir()):
            lines = path.read_bytes().split(b"\n")
            i = 0
            while lines[i].startswith((b"X-Client-", b"X-Helo-", b"X-Mail-", b"X-Rcpt-")):
                i += 1
            assert lines[i].startswith(b"Received: ")
            i += 1
            while lines[i].startswith(b"\t"):
                i += 1
            out.append(b"\n".join(lines[i:])[:-1])  # smtp-sink ends each dump with an empty line
        return out


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    if not os.path.exists(SMTP_SINK):
        pytest.skip(f"{SMTP_SINK} not installed (Postfix's smtp-sink: apt-get install postfix)")
    # Not under pytest's tmp_path (private to root): smtp-sink writes as the user it switched to.
    dump = Path(tempfile.mkdtemp(prefix="bulkmail-smtp-sink-"))
    dump.chmod(0o777)
    port = free_port()
    cmd = [SMTP_SINK, "-d", f"{dump}/m.", "-m", "500"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = subprocess.Popen([*cmd, f"127.0.0.1:{port}", "500"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "smtp-sink did not start"
                time.sleep(0.05)
        yield SmtpSink(port, dump, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(dump, ignore_errors=True)


def check_received_once(sink: SmtpSink, envs: list[Envelope]) -> None:
    got = sink.messages()
    want = sorted(e.data.replace(b"\r\n", b"\n") for e in envs)
    assert sorted(got) == want  # every message once, with its bytes (so its Message-ID)


def test_threads_over_smtp_sink_every_message_once(smtp_sink: SmtpSink) -> None:
    snd = sync_sender(smtp_sink.port, max_per_connection=40)
    envs = [env(i, body=b".a line with a dot\r\n..two\r\n.\r\nend\r\n" if i % 7 == 0 else b"x\r\n")
            for i in range(400)]
    results: list[SendResult] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for e in envs[t::8]:
            r = snd.send_envelope(e)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snd.close()
    assert [r for r in results if not r.ok] == []
    assert snd.connections_opened == 8 * 2 and snd.reconnects == 0  # 50 messages a thread, 40 a connection
    check_received_once(smtp_sink, envs)


def test_async_pool_over_smtp_sink_every_message_once(smtp_sink: SmtpSink) -> None:
    envs = [env(i, body=b".dot\r\n" if i % 5 == 0 else b"y\r\n") for i in range(600)]
    results, snd = async_sends(smtp_sink.port, envs, concurrency=50, max_connections=5,
                               max_per_connection=100)
    assert all(r.ok for r in results)
    assert 6 <= snd.connections_opened <= 10 and snd.reconnects == 0
    check_received_once(smtp_sink, envs)


def test_smtputf8_needed_but_not_offered_is_permanent(smtp_sink: SmtpSink) -> None:
    e = Envelope(FROM, "zoë@example.com", b"Subject: x\r\n\r\nx\r\n", True)
    r = sync_sender(smtp_sink.port).send_envelope(e)
    assert r.status == "permanent" and "SMTPUTF8" in (r.error or "")


# --------------------------------------------------------------------------- a pipelining fake

@dataclass
class Fake:
    """An SMTP server offering PIPELINING, on its own event loop thread. Replies to a chunk of
    commands go out together once the chunk is handled (as Postfix does)."""

    refuse: dict[str, bytes] = field(default_factory=dict)  # RCPT address -> reply
    data_after_refusal: bytes = b"554 5.5.1 no valid recipients"  # a broken server says 354
    mail_421_at: int = 0  # the n-th MAIL (over all connections) gets 421 and a close
    drop: dict[str, str] = field(default_factory=dict)  # address -> "rcpt" | "data": drop, once
    stall: set[str] = field(default_factory=set)  # never answer the end of their data
    close_after: set[str] = field(default_factory=set)  # answer their data, then close, once
    greet_after: float = 0.0  # seconds before the greeting
    tls: str = "none"  # "starttls" or "ssl" (implicit), with `ssl_context`
    ssl_context: ssl.SSLContext | None = None
    auth: dict[str, str] | None = None  # AUTH PLAIN and LOGIN (only over TLS when TLS is on)
    secure: dict[int, tuple[bool, bool]] = field(default_factory=dict)  # conn -> (tls, authenticated)
    received: list[tuple[int, str, bytes]] = field(default_factory=list)  # (conn, rcpt, data)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0  # connections open at once, at most
    mails: int = 0

    def __enter__(self) -> Fake:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self.session, "127.0.0.1", 0,
                                     ssl=self.ssl_context if self.tls == "ssl" else None))
            started.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            # Every session sees its connection go and ends before the loop closes (a session
            # left suspended is finalised later, on a closed loop, and warns).
            for _ in range(200):
                if self.open_now == 0:
                    break
                await asyncio.sleep(0.01)
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:  # e.g. a session accepted while the server closed
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        conn, buf, rcpt, data, in_data = self.connections, b"", "", None, False
        tls, authed, login = self.tls == "ssl", False, None
        self.writers.add(writer)
        try:
            await asyncio.sleep(self.greet_after)
            writer.write(b"220 fake ESMTP\r\n")
            while chunk := await reader.read(65536):
                self.chunks.append((conn, chunk))
                buf += chunk
                out = []
                while b"\r\n" in buf:
                    line, _, buf = buf.partition(b"\r\n")
                    if in_data:
                        if line != b".":
                            data = (data or b"") + (line[1:] if line[:1] == b"." else line) + b"\r\n"
                            continue
                        in_data = False
                        if rcpt in self.stall:
                            continue
                        if self.drop.get(rcpt) == "data":
                            del self.drop[rcpt]
                            writer.transport.abort()
                            return
                        if rcpt:
                            self.received.append((conn, rcpt, data or b""))
                        out.append(b"250 2.0.0 queued" if rcpt else b"554 5.5.1 nothing to deliver")
                        if rcpt in self.close_after:  # what came after it is never answered
                            self.close_after.discard(rcpt)
                            writer.write(b"".join(o + b"\r\n" for o in out))
                            writer.close()
                            return
                        continue
                    if login is not None:  # AUTH LOGIN: the user name, then the password
                        login.append(b64decode(line).decode())
                        if len(login) == 1:
                            out.append(b"334 UGFzc3dvcmQ6")
                            continue
                        authed, login = self.check(conn, tls, *login), None
                        out.append(b"235 2.7.0 ok" if authed else b"535 5.7.8 no")
                        continue
                    verb, _, arg = line.decode().partition(" ")
                    verb = verb.upper()
                    if verb == "EHLO":
                        ext = [b"PIPELINING", b"SIZE 100000"]
                        ext += [b"STARTTLS"] if self.tls == "starttls" and not tls else []
                        ext += [b"AUTH PLAIN LOGIN"] if self.auth and (tls or self.tls == "none") else []
                        out.append(b"\r\n".join(b"250-" + e for e in [b"fake.example", *ext[:-1]])
                                   + b"\r\n250 " + ext[-1])
                    elif verb == "STARTTLS" and self.ssl_context is not None:
                        writer.write(b"220 2.0.0 go ahead\r\n")
                        await writer.drain()
                        await writer.start_tls(self.ssl_context)
                        tls, buf = True, b""  # a command sent in clear after STARTTLS is ignored
                    elif verb == "AUTH":
                        mech, _, initial = arg.partition(" ")
                        if mech.upper() == "LOGIN":
                            login = []
                            out.append(b"334 VXNlcm5hbWU6")
                        else:
                            _, user, password = b64decode(initial).decode().split("\0")
                            authed = self.check(conn, tls, user, password)
                            out.append(b"235 2.7.0 ok" if authed else b"535 5.7.8 no")
                    elif verb == "MAIL" and self.auth and not authed:
                        out.append(b"530 5.7.0 authentication required")
                    elif verb == "MAIL":
                        self.mails += 1
                        rcpt, data = "", None
                        if self.mails == self.mail_421_at:
                            writer.write(b"".join(o + b"\r\n" for o in out) + b"421 4.3.2 shutting down\r\n")
                            writer.close()
                            return
                        out.append(b"250 2.1.0 ok")
                    elif verb == "RCPT":
                        address = arg.partition("<")[2].partition(">")[0]
                        if self.drop.get(address) == "rcpt":
                            del self.drop[address]
                            writer.transport.abort()
                            return
                        if address in self.refuse:
                            out.append(self.refuse[address])
                        else:
                            rcpt = address
                            out.append(b"250 2.1.5 ok")
                    elif verb == "DATA":
                        ok = rcpt or self.data_after_refusal.startswith(b"354")
                        in_data, data = bool(ok), None
                        out.append(b"354 go ahead" if rcpt else self.data_after_refusal)
                    elif verb == "RSET":
                        rcpt, data = "", None
                        out.append(b"250 2.0.0 reset")
                    elif verb == "QUIT":
                        writer.write(b"".join(o + b"\r\n" for o in out) + b"221 bye\r\n")
                        writer.close()
                        return
                    else:
                        out.append(b"502 5.5.2 what")
                if out:
                    writer.write(b"".join(o + b"\r\n" for o in out))
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            self.writers.discard(writer)
            writer.close()

    def check(self, conn: int, tls: bool, user: str, password: str) -> bool:
        ok = self.auth is not None and self.auth.get(user) == password
        self.secure[conn] = (tls, ok)
        return ok

    def commands(self, conn: int = 1) -> list[bytes]:
        raw = b"".join(c for n, c in self.chunks if n == conn)
        return [line.split(b":")[0].split(b" ")[0] for line in raw.split(b"\r\n")
                if line[:4].isupper() and line[:4].isalpha()]


BOTH: list[str] = ["sync", "async"]


def send_all(mode: str, port: int, envs: list[Envelope], **kw: Any) -> tuple[list[SendResult], Any]:
    if mode == "sync":
        snd = sync_sender(port, **kw)
        results = [snd.send_envelope(e) for e in envs]
        snd.close()
        return results, snd
    return async_sends(port, envs, **kw)


@pytest.mark.parametrize("mode", BOTH)
def test_pipelined_group_with_refused_recipients(mode: str) -> None:
    refuse = {"user2@example.com": b"550 5.1.1 no such user", "user4@example.com": b"450 4.2.1 try later"}
    with Fake(refuse=refuse) as fake:
        results, snd = send_all(mode, fake.port, [env(i) for i in range(7)])
    assert [r.status for r in results] == ["sent", "sent", "permanent", "sent", "transient", "sent", "sent"]
    assert results[2].error == "550 5.1.1 no such user" and results[4].error == "450 4.2.1 try later"
    assert [to for _, to, _ in fake.received] == [f"user{i}@example.com" for i in (0, 1, 3, 5, 6)]
    assert fake.connections == 1 == snd.connections_opened and snd.reconnects == 0
    # One write per group: MAIL, RCPT and DATA arrive in one chunk; RSET only after a refusal,
    # at the head of the next group.
    groups = [c for n, c in fake.chunks if c.startswith((b"MAIL", b"RSET"))]
    assert all(g.endswith(b"DATA\r\n") for g in groups)
    assert fake.commands().count(b"RSET") == 2
    assert [g.startswith(b"RSET") for g in groups] == [False, False, False, True, False, True, False]


@pytest.mark.parametrize("mode", BOTH)
def test_data_accepted_after_every_rcpt_refused(mode: str) -> None:
    """A broken server answers DATA with 354 though it refused the RCPT: the client ends the
    empty data with '.' at once, reports the RCPT's refusal and the connection goes on."""
    with Fake(refuse={"user1@example.com": b"550 5.1.1 no"}, data_after_refusal=b"354 go") as fake:
        results, _ = send_all(mode, fake.port, [env(i) for i in range(3)])
    assert [r.status for r in results] == ["sent", "permanent", "sent"]
    assert [to for _, to, _ in fake.received] == ["user0@example.com", "user2@example.com"]
    assert fake.connections == 1


@pytest.mark.parametrize("mode", BOTH)
def test_421_mid_run_reconnects(mode: str) -> None:
    with Fake(mail_421_at=4) as fake:
        results, snd = send_all(mode, fake.port, [env(i) for i in range(8)])
    assert [r.status for r in results] == ["sent"] * 3 + ["transient"] + ["sent"] * 4
    assert (results[3].error or "").startswith("421 4.3.2")
    assert snd.reconnects == 1 and snd.connections_opened == 2 == fake.connections
    assert len(fake.received) == 7


@pytest.mark.parametrize("mode", BOTH)
def test_drop_mid_transaction(mode: str) -> None:
    """Dropped after the data was written: that message fails (transient), the next ones go out
    on a new connection. Dropped before the replies to MAIL/RCPT/DATA: nothing can have been
    delivered, so the message goes out at once on a new connection."""
    drop = {"user2@example.com": "data", "user5@example.com": "rcpt"}
    with Fake(drop=drop) as fake:
        results, snd = send_all(mode, fake.port, [env(i) for i in range(8)])
    assert [r.status for r in results] == ["sent", "sent", "transient"] + ["sent"] * 5
    assert "connection lost" in (results[2].error or "")
    delivered = sorted(to for _, to, _ in fake.received)
    assert delivered == sorted(f"user{i}@example.com" for i in (0, 1, 3, 4, 5, 6, 7))
    assert snd.reconnects == 2 and fake.connections == 3


@pytest.mark.parametrize("mode", BOTH)
def test_silent_server_times_out(mode: str) -> None:
    with Fake(stall={"user1@example.com"}) as fake:
        t0 = time.monotonic()
        results, _ = send_all(mode, fake.port, [env(0), env(1), env(2)], timeout=0.5)
    assert [r.status for r in results] == ["sent", "transient", "sent"]
    assert "TimeoutError" in (results[1].error or "") and time.monotonic() - t0 < 4


def test_async_next_transaction_follows_the_data_in_one_write() -> None:
    """One connection, many coroutines: the next message's MAIL/RCPT/DATA go out with the
    previous message's data and '.', so a message costs one round trip."""
    envs = [env(i, body=b".dot\r\n") for i in range(60)]
    with Fake() as fake:
        results, snd = async_sends(fake.port, envs, concurrency=8, max_connections=1,
                                   max_per_connection=1000)
    assert all(r.ok for r in results) and snd.connections_opened == 1
    assert [(to, data) for _, to, data in fake.received] == [(e.recipient, e.data) for e in envs]
    overlapped = [c for _, c in fake.chunks if b"\r\n.\r\nMAIL FROM:" in c]
    assert len(overlapped) >= 50


def test_async_max_per_connection_with_overlap() -> None:
    with Fake() as fake:
        results, snd = async_sends(fake.port, [env(i) for i in range(100)], concurrency=10,
                                   max_connections=2, max_per_connection=7)
    assert all(r.ok for r in results) and snd.reconnects == 0
    per: dict[int, int] = {}
    for conn, _, _ in fake.received:
        per[conn] = per.get(conn, 0) + 1
    assert max(per.values()) <= 7 and sum(per.values()) == 100
    assert len(per) == snd.connections_opened >= 15


# --------------------------------------------------------------------------- aiosmtpd: lock-step, TLS, AUTH

def test_lockstep_server_without_pipelining() -> None:
    with Sink() as s:
        results, snd = send_all("async", s.port, [env(i, body=b".x\r\n") for i in range(5)])
        sync_results, _ = send_all("sync", s.port, [env(10 + i) for i in range(5)])
    assert all(r.ok for r in results + sync_results)
    assert [r.data for r in s.received[:5]] == [env(i, body=b".x\r\n").data for i in range(5)]
    assert s.stats.connections == 2 and s.stats.rsets == 8  # RSET before each reuse


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the test CA)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


Opener = Callable[[SmtpConfig, ssl.SSLContext, str, tuple[str, ...]], SendResult]


def open_sync(cfg: SmtpConfig, ctx: ssl.SSLContext, password: str, mechs: tuple[str, ...]) -> SendResult:
    conn = SyncConnection.open(cfg, ehlo="client.example", context=ctx, password=password, mechanisms=mechs)
    try:
        return conn.send(env(1))
    finally:
        conn.close()


def open_async(cfg: SmtpConfig, ctx: ssl.SSLContext, password: str, mechs: tuple[str, ...]) -> SendResult:
    async def main() -> SendResult:
        conn = await aio_connection.AsyncConnection.open(cfg, ehlo="client.example", context=ctx,
                                               password=password, mechanisms=mechs)
        try:
            return await conn.send(env(1))
        finally:
            conn.abort()
    return asyncio.run(main())


@pytest.mark.parametrize("server", ["aiosmtpd-starttls", "fake-starttls", "fake-ssl"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("opener", [open_sync, open_async], ids=["sync", "async"])
def test_tls_and_auth(tls: tuple[ssl.SSLContext, ssl.SSLContext], server: str, mechanism: str,
                      opener: Opener) -> None:
    """STARTTLS (lock-step aiosmtpd and the pipelining fake) and implicit TLS (the fake: the
    sink's aiosmtpd offers no AUTH over implicit TLS), AUTH PLAIN and LOGIN, a wrong password,
    an untrusted certificate."""
    server_ctx, client_ctx = tls
    kind, _, mode = server.partition("-")
    with (Sink(tls="starttls", tls_context=server_ctx, auth={"mailer": "s3cret"}) if kind == "aiosmtpd"
          else Fake(tls=mode, ssl_context=server_ctx, auth={"mailer": "s3cret"})) as s:
        cfg = config(s.port, tls=mode, user="mailer")
        assert opener(cfg, client_ctx, "s3cret", (mechanism,)).ok
        with pytest.raises(wire.ReplyError) as refused:
            opener(cfg, client_ctx, "wrong-pw", (mechanism,))
        assert refused.value.code == 535 and "wrong-pw" not in str(refused.value)
        with pytest.raises(ssl.SSLCertVerificationError):
            opener(cfg, ssl.create_default_context(), "s3cret", (mechanism,))
        if isinstance(s, Sink):
            assert [(r.tls, r.authenticated) for r in s.received] == [(True, True)]
            assert s.stats.auth_failures == 1
        else:
            assert [s.secure[conn] for conn, _, _ in s.received] == [(True, True)]
            assert sorted(s.secure.values()) == [(True, False), (True, True)]


def test_auth_not_offered_in_clear_is_refused() -> None:
    with Sink() as s:
        with pytest.raises(wire.NotOffered, match="AUTH"):
            SyncConnection.open(config(s.port, user="mailer"), ehlo="client.example", password="pw")
        assert s.stats.messages == 0

