"""The SMTP senders against a real aiosmtpd server on 127.0.0.1 (pipeline/sink.py).

First the senders alone (no Ray): connection reuse, reconnects, reply codes, TLS and AUTH.
Then whole campaigns through Ray: every recipient gets its own rendered message, connections
stay within the bound, 421s are retried, 550s fail at once, a server outage loses nothing,
STARTTLS + AUTH through the CLI never leaks the password.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import trustme

from pipeline.campaign import run_campaign
from pipeline.compose import Composer
from pipeline.config import MessageConfig, RetryPolicy, SmtpConfig
from pipeline.lab.sink import Sink, SinkHandler, fate
from pipeline.ledger import LedgerWriter, read_journal
from pipeline.messages import Message
from pipeline.sending.smtp import AsyncSmtpSender, SmtpSender, reply_result
from pipeline.sending.threads import ThreadEngine

from .conftest import campaign, cli, read_ledger, write_recipients
from .test_wire import COMPOSER, Fake

FROM = "News <news@bulkmail.example>"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for 127.0.0.1 signed by a CA made here, and that
    CA's PEM file for the client to trust."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server_ctx, ca_file


def msg(i: int, name: str | None = None, domain: str = "example.com") -> Message:
    return Message(i, f"user{i}@{domain}", f"<t.{i}@bulkmail.example>",
                   {"name": name if name is not None else f"Person {i}"})


def sender(s: Sink, **smtp: Any) -> SmtpSender:
    config = SmtpConfig(host=s.host, port=s.port, timeout=5, **smtp)
    return SmtpSender(config, Composer(MessageConfig(from_addr=FROM), campaign="t"))


def bodies(tmp_path: Path) -> Path:
    (tmp_path / "body.txt").write_text("Dear {{ name }},\nnews for {{ city }} ({{ plan }}).\n")
    (tmp_path / "body.html").write_text("<p>Dear {{ name }}, news for {{ city }}.</p>\n")
    return tmp_path / "body.txt"


# --------------------------------------------------------------------------- the sender alone

def test_reply_codes_map_to_outcomes() -> None:
    assert reply_result(421, b"4.7.0 busy") == reply_result(421, "4.7.0 busy")
    assert reply_result(451, "later").status == "transient"
    assert reply_result(550, b"5.1.1 no such user\n more").status == "permanent"
    assert reply_result(550, b"5.1.1 no such user\n more").error == "550 5.1.1 no such user more"
    assert reply_result(554, "x", "connect").error == "connect: 554 x"


def test_connection_reused_with_rset_and_replaced_after_max(sink: Sink) -> None:
    s = sender(sink, max_per_connection=3)
    results = [s.send(msg(i)) for i in range(7)]
    assert all(r.ok for r in results)
    assert s.connections_opened == 3 and s.reconnects == 0
    assert sorted(sink.stats.per_connection.values()) == [1, 3, 3]
    assert sink.stats.connections == 3
    assert sink.stats.rsets >= 4  # one before each reuse: 2 + 2 on the first two connections


def test_each_thread_keeps_its_own_connection(sink: Sink) -> None:
    s = sender(sink, max_per_connection=1000)
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(25):
            assert s.send(msg(t * 100 + i)).ok
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.stats.messages == 100
    assert s.connections_opened == 4 == sink.stats.connections
    assert sorted(sink.stats.per_connection.values()) == [25, 25, 25, 25]


def test_dropped_connection_is_replaced_without_failing_a_message(sink: Sink) -> None:
    s = sender(sink)
    assert all(s.send(msg(i)).ok for i in range(3))
    sink.drop_connections()  # the server cuts the idle connection
    assert s.send(msg(3)).ok  # RSET fails, a new connection carries the message
    assert s.reconnects == 1 and s.connections_opened == 2
    assert sink.stats.messages == 4


class _CutsOnce(SinkHandler):
    """Cuts the connection in the middle of the DATA of the first message to `victim`."""

    victim = "user5@example.com"

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self.cut = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.victim in envelope.rcpt_tos and not self.cut:
            self.cut = True
            server.transport.abort()
            await asyncio.sleep(0.05)
            return "451 never seen"
        return await super().handle_DATA(server, session, envelope)


def test_connection_lost_mid_message_fails_only_that_message() -> None:
    with Sink(handler=_CutsOnce) as s:
        snd = sender(s)
        assert snd.send(msg(4)).ok
        lost = snd.send(msg(5))
        assert lost.status == "transient" and "connection lost" in (lost.error or "")
        assert [snd.send(msg(i)).ok for i in (6, 7)] == [True, True]  # not poisoned
        assert snd.send(msg(5)).ok  # the retry goes through
        assert [r.rcpt_tos[0] for r in s.received] == [f"user{i}@example.com" for i in (4, 6, 7, 5)]
        assert snd.reconnects == 1


def test_server_down_is_transient_and_refusals_carry_server_text() -> None:
    with Sink(fail_5xx=1.0) as s:
        snd = sender(s)
        refused = snd.send(msg(1))
        assert refused.status == "permanent"
        assert refused.error == "550 5.1.1 Mailbox unavailable (bulkmail sink)"
        s.stop()
        down = snd.send(msg(2))
        assert down.status == "transient" and "Connection" in (down.error or "")


def test_starttls_asked_but_not_offered_never_sends_in_clear(sink: Sink) -> None:
    config = SmtpConfig(host=sink.host, port=sink.port, tls="starttls", timeout=5)
    sync = SmtpSender(config, Composer(MessageConfig(from_addr=FROM), campaign="spring")).send(msg(1))
    asyn = asyncio.run(AsyncSmtpSender(config, Composer(MessageConfig(from_addr=FROM), campaign="spring"))
                       .asend(msg(2)))
    for r in (sync, asyn):
        assert r.status == "permanent" and "STARTTLS" in (r.error or "")
    assert sink.stats.messages == 0


def test_starttls_and_auth_checked_by_the_server(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    server_ctx, ca_file = tls_files
    with Sink(tls="starttls", tls_context=server_ctx, auth={"mailer": "right"}) as s:
        base = SmtpConfig(host=s.host, port=s.port, tls="starttls", user="mailer",
                          ca_file=str(ca_file), timeout=5)
        good = SmtpSender(base, Composer(MessageConfig(from_addr=FROM), campaign="spring"), password="right")
        assert good.send(msg(1)).ok
        bad = SmtpSender(base, Composer(MessageConfig(from_addr=FROM), campaign="spring"), password="wrong")
        refused = bad.send(msg(2))
        assert refused.status == "permanent" and (refused.error or "").startswith("connect: 535")
        # Without the test CA the certificate is not trusted: no message goes out in clear.
        untrusted = SmtpSender(SmtpConfig(host=s.host, port=s.port, tls="starttls", user="mailer",
                                          timeout=5),
                               Composer(MessageConfig(from_addr=FROM), campaign="spring"), password="right")
        assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.send(msg(3)).error or "")
        assert [(r.tls, r.authenticated) for r in s.received] == [(True, True)]
        assert s.stats.auth_failures >= 1  # smtplib tries PLAIN, then LOGIN


def test_implicit_tls_and_async_starttls_auth(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    server_ctx, ca_file = tls_files
    with Sink(tls="ssl", tls_context=server_ctx) as s:
        snd = SmtpSender(SmtpConfig(host=s.host, port=s.port, tls="ssl", ca_file=str(ca_file),
                                    timeout=5), Composer(MessageConfig(from_addr=FROM), campaign="spring"))
        assert snd.send(msg(1)).ok and s.received[0].tls
    with Sink(tls="starttls", tls_context=server_ctx, auth={"mailer": "right"}) as s:
        config = SmtpConfig(host=s.host, port=s.port, tls="starttls", user="mailer",
                            ca_file=str(ca_file), timeout=5)

        async def main() -> list[Any]:
            good = AsyncSmtpSender(config, Composer(MessageConfig(from_addr=FROM), campaign="spring"),
                                   password="right")
            bad = AsyncSmtpSender(config, Composer(MessageConfig(from_addr=FROM), campaign="spring"),
                                  password="wrong")
            out = [await good.asend(msg(1)), await good.asend(msg(2)), await bad.asend(msg(3))]
            await good.aclose()
            return out
        ok1, ok2, refused = asyncio.run(main())
        assert ok1.ok and ok2.ok
        assert refused.status == "permanent" and (refused.error or "").startswith("connect: 535")
        assert [(r.tls, r.authenticated, r.connection) for r in s.received] == [
            (True, True, s.received[0].connection)] * 2  # both over one connection


def test_async_sender_pools_connections_and_survives_a_drop(sink: Sink) -> None:
    snd = AsyncSmtpSender(SmtpConfig(host=sink.host, port=sink.port, timeout=5,
                                     max_per_connection=5),
                          Composer(MessageConfig(from_addr=FROM), campaign="t"))

    async def main() -> None:
        first = await asyncio.gather(*(snd.asend(msg(i)) for i in range(10)))
        assert all(r.ok for r in first)
        opened = snd.connections_opened
        assert opened <= 10
        sink.drop_connections()
        second = [await snd.asend(msg(100 + i)) for i in range(12)]
        assert all(r.ok for r in second)
        await snd.aclose()
    asyncio.run(main())
    assert sink.stats.messages == 22
    assert snd.reconnects >= 1
    assert max(sink.stats.per_connection.values()) <= 5


# --------------------------------------------------------------------------- chained sends

def _chained(tmp_path: Path, port: int, *, threads: int = 1, limiter: Any = None,
             max_per_connection: int = 1000, relay_limiter: Any = None,
             composer: Composer = COMPOSER, warm: bool = False) -> ThreadEngine:
    """The thread engine over SmtpSender, as a sender actor runs them, into test_wire's Fake
    (a server offering PIPELINING that records what each read brought)."""
    ledger = LedgerWriter(str(tmp_path / "run"), writer="w", node="n", run="r", epoch=1)
    snd = SmtpSender(SmtpConfig(host="127.0.0.1", port=port, timeout=5,
                                max_per_connection=max_per_connection), composer,
                     local_hostname="client.example",
                     limiters={f"127.0.0.1:{port}": relay_limiter} if relay_limiter else None)
    return ThreadEngine(snd, concurrency=threads, ledger=ledger, limiter=limiter, warm=warm,
                        retry=RetryPolicy(max_attempts=3, backoff_base=0.05))


def _chained_with(fake: Fake, before: int, after: int) -> bool:
    """Whether message `before`'s data and message `after`'s commands reached the server in one
    read (messages of `_msgs`: Message-ID <c.N@...>, to userN@example.com)."""
    return any(f"Message-ID: <c.{before}@".encode() in c
               and f"RCPT TO:<user{after}@example.com>".encode() in c for _, c in fake.chunks)


class _Unpaced:
    """A rate's turn, always granted at once: what matters is that there is a rate."""

    cancelled = False

    def wait(self) -> None:
        pass

    async def await_turn(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def _msgs(n: int) -> list[Message]:
    return [Message(i, f"user{i}@example.com", f"<c.{i}@bulkmail.example>", {}) for i in range(n)]


def _attempts(tmp_path: Path) -> dict[int, int]:
    rows = read_journal(str(tmp_path / "run"))
    return dict(zip(rows["id"].to_list(), rows["attempts"].to_list(), strict=True))


def test_sending_threads_chain_each_message_in_one_write(tmp_path: Path) -> None:
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, threads=2)
        counts = e.run(_msgs(200))
        e.close()
    assert counts.sent == 200 and counts.retries == 0
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in _msgs(200))
    assert fake.connections == 2
    # A message's data, "." and the next message's MAIL in one write, as the async pumps do.
    overlapped = [c for _, c in fake.chunks if b"\r\n.\r\nMAIL FROM:" in c]
    assert len(overlapped) >= 190


def test_a_chained_message_is_timed_from_its_commands(tmp_path: Path) -> None:
    """A chained message's attempt began when its commands went out with the data of the one
    before it: in the ledger it starts before that one's final reply, and its latency is the
    whole transaction's, not the part after the thread took it up."""
    with Fake() as fake:
        e = _chained(tmp_path, fake.port)
        assert e.run(_msgs(20)).sent == 20
        e.close()
        e.ledger.flush()
    assert _chained_with(fake, 0, 1)
    rows = read_journal(str(tmp_path / "run")).sort("id")
    started, finished = rows["started_at"].to_list(), rows["finished_at"].to_list()
    chained = [i for i in range(1, 20) if _chained_with(fake, i - 1, i)]
    assert len(chained) >= 18  # one thread: every message after the first, but after a reconnect
    for i in chained:
        assert started[i] < finished[i - 1] <= finished[i]


@pytest.mark.parametrize("rate", ["global", "relay"])
def test_nothing_overlaps_under_a_rate(tmp_path: Path, rate: str) -> None:
    """--rate or a relay's rate: each transaction waits for its own turn, none overlaps."""
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, limiter=_Unpaced() if rate == "global" else None,
                     relay_limiter=_Unpaced() if rate == "relay" else None)
        assert e.run(_msgs(20)).sent == 20
        e.close()
    assert len(fake.received) == 20
    assert not [c for _, c in fake.chunks if b"\r\n.\r\nMAIL FROM:" in c]


def test_chains_end_at_max_per_connection_and_threads_end_on_close(tmp_path: Path) -> None:
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, max_per_connection=3)
        assert e.run(_msgs(10)).sent == 10
        e.close()
        threads = e._threads
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert fake.connections == 4 and len(fake.received) == 10  # 3 + 3 + 3 + 1
    assert _chained_with(fake, 0, 1)
    assert not _chained_with(fake, 2, 3)  # a new connection


def test_a_stop_mid_chain_sends_or_abandons_each_message_once(tmp_path: Path) -> None:
    """A thread's next message, taken as its data went out, is in flight: it finishes after a
    stop; the queued ones are abandoned. None is lost, none counted twice."""
    n = 5000
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, threads=4)
        counts = e.run(_msgs(n), should_stop=lambda: len(fake.received) >= 200)
        e.close()
        e.ledger.flush()
    got = [to for _, to, _ in fake.received]
    assert counts.failed == 0 and counts.abandoned > 0 and counts.sent + counts.abandoned == n
    assert len(got) == len(set(got)) == counts.sent
    rows = read_journal(str(tmp_path / "run"))
    assert rows.height == counts.sent and rows["id"].is_unique().all()


def test_a_composer_bug_on_the_next_message_fails_only_it(tmp_path: Path) -> None:
    class Bad:
        def __str__(self) -> Any:
            return 42  # str() raises TypeError inside the composer's own code

    batch = _msgs(8)
    batch[3] = Message(3, "user3@example.com", "<c.3@bulkmail.example>", {"name": Bad()})
    with Fake() as fake:
        e = _chained(tmp_path, fake.port)
        counts = e.run(batch)
        e.close()
        e.ledger.flush()
    assert counts.sent == 7 and counts.failed == 1 and counts.attempts == 8
    assert fake.connections == 1 and len(fake.received) == 7
    rows = read_journal(str(tmp_path / "run"))
    failed = rows.filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [3] and "message not built" in failed["error"][0]
    assert _chained_with(fake, 4, 5)


def test_a_message_over_the_servers_size_is_refused_before_it_would_be_chained(
        tmp_path: Path) -> None:
    """The Fake announces SIZE 100000: user4's message is over it, so its transaction never
    begins (nothing of it written) and it fails alone; the chain goes on after it."""
    composer = Composer(MessageConfig(from_addr=FROM, body="{{ name }}\n"), campaign="t")
    batch = [Message(i, f"user{i}@example.com", f"<c.{i}@bulkmail.example>",
                     {"name": "word " * (30_000 if i == 4 else 2)}) for i in range(8)]
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, composer=composer)
        counts = e.run(batch)
        e.close()
        e.ledger.flush()
    assert counts.sent == 7 and counts.failed == 1 and counts.attempts == 8
    assert fake.connections == 1 and len(fake.received) == 7
    failed = read_journal(str(tmp_path / "run")).filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [4] and "SIZE" in failed["error"][0]
    assert not any(b"RCPT TO:<user4@example.com>" in c for _, c in fake.chunks)
    assert _chained_with(fake, 5, 6)


def test_a_421_inside_a_chain_retries_that_message_on_a_new_connection(tmp_path: Path) -> None:
    """The server answers user3's data, then 421 to user4's MAIL (in the same write) and
    closes: user3 is sent, user4 refused for now (transient, retried), each arrives once."""
    with Fake(mail_421_at=5) as fake:
        e = _chained(tmp_path, fake.port)
        counts = e.run(_msgs(10))
        e.close()
        e.ledger.flush()
    assert counts.sent == 10 and counts.attempts == 11 and fake.connections == 2
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in _msgs(10))
    attempts = _attempts(tmp_path)
    assert attempts[4] == 2 and all(attempts[i] == 1 for i in range(10) if i != 4)
    assert _chained_with(fake, 3, 4)


def test_a_connection_broken_mid_chain_retries_the_written_one_and_sends_the_next_fresh(
        tmp_path: Path) -> None:
    """The server drops the connection at the end of user3's data, when user4's commands came
    in the same write: user3 may have been delivered (transient, retried after a backoff), user4
    cannot have been (sent at once on a new connection, not an attempt). Each arrives once."""
    with Fake(drop={"user3@example.com": "data"}) as fake:
        e = _chained(tmp_path, fake.port)
        counts = e.run(_msgs(10))
        e.close()
        e.ledger.flush()
    assert counts.sent == 10 and counts.retries == 1 and counts.attempts == 11
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in _msgs(10))
    attempts = _attempts(tmp_path)
    assert attempts[3] == 2 and all(attempts[i] == 1 for i in range(10) if i != 3)
    assert _chained_with(fake, 3, 4)


def test_a_refusal_inside_a_chain_fails_that_message_and_the_chain_goes_on(
        tmp_path: Path) -> None:
    with Fake(refuse={"user4@example.com": b"550 5.1.1 no such user"}) as fake:
        e = _chained(tmp_path, fake.port)
        counts = e.run(_msgs(10))
        e.close()
        e.ledger.flush()
    assert counts.sent == 9 and counts.failed == 1 and counts.attempts == 10
    assert sorted(to for _, to, _ in fake.received) == [f"user{i}@example.com" for i in range(10)
                                                          if i != 4]
    assert fake.connections == 1  # RSET, then the next message, on the same connection
    rows = read_journal(str(tmp_path / "run")).filter(pl.col("id") == 4)
    assert rows["error"].to_list() == ["550 5.1.1 no such user"]
    assert _chained_with(fake, 3, 4)
    assert _chained_with(fake, 5, 6)


def test_a_server_closing_after_a_reply_sends_the_chained_message_fresh(tmp_path: Path) -> None:
    """user2's data is answered, then the connection closes: user3's commands, written with that
    data, were never answered, so user3 goes at once on a new connection, one attempt."""
    with Fake(close_after={"user2@example.com"}) as fake:
        e = _chained(tmp_path, fake.port)
        counts = e.run(_msgs(8))
        e.close()
        e.ledger.flush()
    assert counts.sent == 8 and counts.attempts == 8
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in _msgs(8))
    assert fake.connections == 2 and set(_attempts(tmp_path).values()) == {1}
    assert _chained_with(fake, 2, 3)


# --------------------------------------------------------------------------- warm threads

def _until(ok: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not ok() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(ok())


def test_warm_threads_connect_before_their_first_message_and_send_on_those(
        tmp_path: Path) -> None:
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, threads=3, warm=True)
        # Each thread connects and says EHLO as the engine starts, before any message.
        assert _until(lambda: sum(b"EHLO client.example" in c for _, c in fake.chunks) == 3)
        assert fake.connections == 3 == fake.open_now and not fake.mails
        assert e.run(_msgs(30)).sent == 30
        e.close()
    assert fake.connections == 3 and len(fake.received) == 30  # those three, none more
    with Fake() as cold:
        e = _chained(tmp_path, cold.port, threads=3)
        time.sleep(0.3)
        assert cold.connections == 0  # not warm: a thread connects for its first message
        e.close()


def test_a_relay_down_as_threads_warm_up_fails_no_thread_and_no_message(tmp_path: Path) -> None:
    with Fake() as fake:
        port = fake.port
    e = _chained(tmp_path, port, threads=2, warm=True)  # nothing listens on `port` any more
    pool = e.sender.pool  # type: ignore[attr-defined]
    assert _until(lambda: pool.relays[0].failures == 2)  # each thread tried, and gave up
    assert pool.live == 0 and all(t.is_alive() for t in e._threads)
    assert read_journal(str(tmp_path / "run")).height == 0  # warming records nothing
    counts = e.run(_msgs(2))  # the messages meet the relay down, as they would cold
    e.close()
    assert counts.sent == 0 and counts.failed == 2


def test_warm_connections_the_server_dropped_while_idle_cost_no_attempt(tmp_path: Path) -> None:
    with Fake() as fake:
        e = _chained(tmp_path, fake.port, threads=2, warm=True)
        snd = e.sender  # type: ignore[attr-defined]
        assert _until(lambda: snd.connections_opened == 2)  # both threads' EHLOs answered
        for w in list(fake.writers):  # an idle timeout on the server's side
            fake.loop.call_soon_threadsafe(w.close)
        assert _until(lambda: fake.open_now == 0)
        counts = e.run(_msgs(6))
        e.close()
        e.ledger.flush()
    # Each thread's first message found its connection closed before its data went out: sent
    # at once on a new one, one attempt, as on a connection that had carried messages before.
    assert counts.sent == 6 and counts.retries == 0 and set(_attempts(tmp_path).values()) == {1}
    assert snd.reconnects >= 1 and fake.connections == 2 + snd.reconnects  # a thread may get none


def test_closing_while_threads_warm_up_leaves_no_connection_open(tmp_path: Path) -> None:
    with Fake(greet_after=0.5) as fake:
        e = _chained(tmp_path, fake.port, threads=3, warm=True)
        assert _until(lambda: fake.connections == 3)  # the threads wait for the greeting
        e.close()
        snd = e.sender  # type: ignore[attr-defined]
        assert _until(lambda: fake.open_now == 0)  # each connection made was closed
        assert _until(lambda: snd.pool.live == 0) and not snd._all  # and its slot given back


# --------------------------------------------------------------------------- whole campaigns

def smtp_campaign(tmp_path: Path, path: Path, s: Sink, *, max_per_connection: int = 100,
                  retry: RetryPolicy | None = None, message: MessageConfig | None = None,
                  **opts: Any) -> Any:
    return campaign(
        tmp_path, path, sender="smtp",
        smtp=SmtpConfig(host=s.host, port=s.port, max_per_connection=max_per_connection,
                        timeout=5),
        message=message or MessageConfig(from_addr=FROM),
        retry=retry or RetryPolicy(max_attempts=3, backoff_base=0.01), **opts)


def connection_bound(messages: int, threads: int, max_per_connection: int) -> int:
    """Each thread opens ceil(its messages / max) connections; summed over threads that is at
    most ceil(all messages / max) + threads."""
    return math.ceil(messages / max_per_connection) + threads


@pytest.mark.usefixtures("ray_session")
def test_2000_recipients_each_get_their_own_rendered_message(tmp_path: Path, sink: Sink) -> None:
    rows = 2000
    path = write_recipients(tmp_path / "in.parquet", rows)
    people = pl.read_parquet(path)
    message = MessageConfig(from_addr=FROM, subject="Hello {{ name }} in {{ city }}",
                            template=str(bodies(tmp_path)),
                            unsubscribe_url="https://bulkmail.example/u?id={{ id }}")
    rep = run_campaign(smtp_campaign(tmp_path, path, sink, max_per_connection=10,
                                     message=message, actors=4, threads_per_actor=20))
    led = read_ledger(tmp_path)
    assert rep.counts.sent == rows and (led["status"] == "sent").all()
    assert (led["attempts"] == 1).all()

    # Exactly 2,000 messages, one per recipient, each to its own address.
    assert sink.stats.messages == rows == len(sink.received)
    rcpts = [r.rcpt_tos for r in sink.received]
    assert all(len(r) == 1 for r in rcpts)
    assert sorted(r[0] for r in rcpts) == sorted(people["email"].to_list())

    by_email = {row["email"]: row for row in people.iter_rows(named=True)}
    ledger_mid = dict(zip(led["email"].to_list(), led["message_id"].to_list(), strict=True))
    for r in sink.received:
        to = r.rcpt_tos[0]
        person = by_email[to]
        m = r.message()
        assert m["Message-ID"] == ledger_mid[to]
        assert m["To"].addresses[0].addr_spec == to
        assert m["To"].addresses[0].display_name == person["name"]
        assert m["Subject"] == f"Hello {person['name']} in {person['city']}"
        text = m.get_body(("plain",)).get_content()
        assert text == f"Dear {person['name']},\nnews for {person['city']} ({person['plan']}).\n"
        assert person["name"] in m.get_body(("html",)).get_content()
        assert m["List-Unsubscribe"] == f"<https://bulkmail.example/u?id={person['id']}>"
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert m["Date"] is not None and m["From"] == FROM

    # Pooled connections: at most 10 messages each, and no more connections than the bound.
    threads = 4 * 20
    assert max(sink.stats.per_connection.values()) <= 10
    assert math.ceil(rows / 10) <= sink.stats.connections <= connection_bound(rows, threads, 10)
    # RSET before every reuse of a connection.
    assert sink.stats.rsets >= rows - sink.stats.connections


@pytest.mark.usefixtures("ray_session")
def test_421_retried_until_sent_and_550_failed_at_once(tmp_path: Path) -> None:
    rows = 1000
    path = write_recipients(tmp_path / "in.parquet", rows)
    emails = pl.read_parquet(path)["email"].to_list()
    with Sink(fail_4xx=0.2, fail_5xx=0.03, seed=3) as s:
        fates = {e: fate(e, fail_4xx=0.2, fail_5xx=0.03, seed=3) for e in emails}
        rep = run_campaign(smtp_campaign(tmp_path, path, s, max_per_connection=20,
                                         actors=2, threads_per_actor=10))
        led = read_ledger(tmp_path)
        transient = {e for e, f in fates.items() if f == "4xx"}
        permanent = {e for e, f in fates.items() if f == "5xx"}
        assert 150 < len(transient) < 250 and 10 < len(permanent) < 60  # about 20% and 3%

        sent = led.filter(pl.col("status") == "sent")
        failed = led.filter(pl.col("status") == "failed")
        assert set(failed["email"].to_list()) == permanent
        assert (failed["attempts"] == 1).all()
        assert (failed["error"] == "550 5.1.1 Mailbox unavailable (bulkmail sink)").all()
        assert set(sent["email"].to_list()) == set(emails) - permanent
        retried = sent.filter(pl.col("attempts") > 1)
        assert set(retried["email"].to_list()) == transient
        assert (retried["attempts"] == 2).all()
        assert rep.counts.failed == len(permanent)

        # The server got each accepted message once; every 421 closed its connection, so the
        # bound grows by one reconnect per 421.
        assert sorted(r.rcpt_tos[0] for r in s.received) == sorted(set(emails) - permanent)
        assert s.stats.refused_4xx == len(transient)
        assert s.stats.connections <= connection_bound(rows, 20, 20) + s.stats.refused_4xx


@pytest.mark.usefixtures("ray_session")
def test_server_stopped_mid_run_and_restarted_loses_nothing(tmp_path: Path, sink: Sink) -> None:
    rows = 2000
    path = write_recipients(tmp_path / "in.parquet", rows)
    outage: dict[str, int] = {}

    def take_server_away() -> None:
        while sink.stats.messages < 400:
            time.sleep(0.005)
        sink.stop()
        outage["at"] = sink.stats.messages
        time.sleep(3.0)
        outage["restart"] = sink.stats.messages
        sink.start()
    t = threading.Thread(target=take_server_away, daemon=True)
    t.start()
    # Backoff capped at 0.5 s and 40 attempts: a message can wait out about 10 s of outage.
    rep = run_campaign(smtp_campaign(
        tmp_path, path, sink, max_per_connection=50, actors=2, threads_per_actor=10,
        retry=RetryPolicy(max_attempts=40, backoff_base=0.05, backoff_cap=0.5)))
    t.join(10)
    assert outage["at"] < rows  # the outage happened in the middle of the run
    assert outage["restart"] == outage["at"]  # nothing was accepted while it was down
    assert sink.stats.messages > outage["at"]  # and it was sending again afterwards

    led = read_ledger(tmp_path)
    assert rep.counts.sent == rows and (led["status"] == "sent").all()
    assert (led["attempts"] > 1).sum() > 0  # the outage was felt and retried through
    emails = set(pl.read_parquet(path)["email"].to_list())
    received = [r.rcpt_tos[0] for r in sink.received]
    assert set(received) == emails  # nothing lost
    # A message cut between the server's "250" and the client reading it is sent again:
    # at most the sends in flight when the server died (20 threads).
    assert len(received) - rows <= 20


@pytest.mark.usefixtures("ray_session")
def test_async_mode_sends_through_the_sink(tmp_path: Path) -> None:
    rows = 600
    path = write_recipients(tmp_path / "in.parquet", rows)
    emails = pl.read_parquet(path)["email"].to_list()
    with Sink(fail_4xx=0.1, seed=5) as s:
        rep = run_campaign(smtp_campaign(tmp_path, path, s, max_per_connection=10, actors=2,
                                         mode="async", concurrency_per_actor=20))
        led = read_ledger(tmp_path)
        assert rep.counts.sent == rows and (led["status"] == "sent").all()
        transient = {e for e in emails if fate(e, fail_4xx=0.1, fail_5xx=0, seed=5) == "4xx"}
        assert set(led.filter(pl.col("attempts") == 2)["email"].to_list()) == transient
        assert sorted(r.rcpt_tos[0] for r in s.received) == sorted(emails)
        mids = dict(zip(led["email"].to_list(), led["message_id"].to_list(), strict=True))
        assert all(r.message()["Message-ID"] == mids[r.rcpt_tos[0]] for r in s.received)
        assert max(s.stats.per_connection.values()) <= 10
        assert s.stats.connections <= connection_bound(rows, 40, 10) + s.stats.refused_4xx


@pytest.mark.usefixtures("ray_session")
def test_values_cannot_inject_headers_or_run_as_template_code(tmp_path: Path, sink: Sink) -> None:
    names = ["Eve\r\nBcc: victim@example.org", "{{ 7*7 }}", "<b>Bob</b> & {% if 1 %}x{% endif %}",
             "Zoë Øster", "Mal\nX-Injected: yes"]
    frame = pl.DataFrame({"id": list(range(len(names))),
                          "email": [f"p{i}@example.com" for i in range(len(names))],
                          "name": names, "city": ["Lyon", "Lima", "Linz", "Lund", "Leeds"],
                          "plan": ["free"] * len(names)})
    path = tmp_path / "in.parquet"
    frame.write_parquet(path)
    rep = run_campaign(smtp_campaign(
        tmp_path, path, sink, actors=1, threads_per_actor=2,
        message=MessageConfig(from_addr=FROM, subject="Hello {{ name }}",
                              template=str(bodies(tmp_path)))))
    led = read_ledger(tmp_path).sort("id")
    assert led["status"].to_list() == ["invalid", "sent", "sent", "sent", "invalid"]
    assert "header injection" in led["error"][0]
    assert rep.counts.sent == 3

    got = {r.rcpt_tos[0]: r for r in sink.received}
    assert set(got) == {"p1@example.com", "p2@example.com", "p3@example.com"}
    for r in sink.received:
        assert b"Bcc" not in r.data and b"X-Injected" not in r.data
    literal = got["p1@example.com"].message()
    assert literal["Subject"] == "Hello {{ 7*7 }}"
    assert literal["To"].addresses[0].display_name == "{{ 7*7 }}"
    assert "Dear {{ 7*7 }}," in literal.get_body(("plain",)).get_content()
    html = got["p2@example.com"].message().get_body(("html",)).get_content()
    assert "&lt;b&gt;Bob&lt;/b&gt; &amp; {% if 1 %}x{% endif %}" in html
    assert got["p3@example.com"].message()["Subject"] == "Hello Zoë Øster"


def test_starttls_auth_through_the_cli_never_leaks_the_password(
        tmp_path: Path, tls_files: tuple[ssl.SSLContext, Path]) -> None:
    server_ctx, ca_file = tls_files
    password = "pw-" + secrets.token_hex(12)
    rows = 200
    path = write_recipients(tmp_path / "in.parquet", rows)
    bodies(tmp_path)  # body.txt + body.html, named by a relative path below
    with Sink(tls="starttls", tls_context=server_ctx, auth={"mailer": password}) as s:
        res = cli("--input", str(path), "--campaign", "tls", "--runs-dir", str(tmp_path / "runs"),
                  "--sender", "smtp", "--smtp-host", s.host, "--smtp-port", str(s.port),
                  "--smtp-tls", "starttls", "--smtp-user", "mailer",
                  "--smtp-ca-file", str(ca_file), "--actors", "2", "--threads-per-actor", "5",
                  "--no-dashboard", "--no-charts", "--from", FROM, "--template", "body.txt",
                  cwd=tmp_path, env={"BULKMAIL_SMTP_PASSWORD": password})
        assert res.returncode == 0, res.stderr
        assert s.stats.messages == rows and s.stats.auth_failures == 0
        assert all(r.tls and r.authenticated for r in s.received)
        # The actors rendered the template the driver read (they need no copy of the file).
        first = s.received[0].message()
        assert first.get_body(("plain",)).get_content().startswith("Dear ")
        assert first.get_body(("html",)).get_content().startswith("<p>Dear ")
    assert (read_ledger(tmp_path, "tls")["status"] == "sent").all()
    secret = password.encode()
    assert secret not in res.stdout.encode() and secret not in res.stderr.encode()
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(files) >= 3  # ledger, report.json, report.md at least
    for p in files:
        assert secret not in p.read_bytes(), p


def test_smtp_user_without_password_env_is_a_usage_error(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 5)
    res = cli("--input", str(path), "--runs-dir", str(tmp_path / "runs"), "--sender", "smtp",
              "--smtp-tls", "starttls", "--smtp-user", "mailer", cwd=tmp_path,
              env={"BULKMAIL_SMTP_PASSWORD": ""})
    assert res.returncode == 2
    assert "BULKMAIL_SMTP_PASSWORD" in res.stderr and len(res.stderr.strip().splitlines()) == 1
