"""The connection pumps (pipeline/sending/pump.py) behind the async SMTP path, driven by the
AsyncEngine as a sender actor drives them, against the test SMTP servers of test_wire: what
overlaps, what a broken connection does to the messages in flight, and that a bug in composing
fails one message without stopping the pump."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from pipeline.compose import Envelope
from pipeline.config import Relay, RetryPolicy, SmtpConfig
from pipeline.lab.sink import free_port
from pipeline.ledger import LedgerWriter, read_journal
from pipeline.messages import Message
from pipeline.sending.aio import AsyncEngine
from pipeline.sending.smtp import AsyncSmtpSender
from tests.test_wire import COMPOSER, FROM, Fake, config, env


def engine(tmp_path: Path, port: int, *, connections: int, **smtp: Any) -> AsyncEngine:
    sender = AsyncSmtpSender(config(port, **smtp), COMPOSER, local_hostname="client.example",
                             max_connections=connections)
    ledger = LedgerWriter(str(tmp_path / "run"), writer="w", node="n", run="r", epoch=1)
    return AsyncEngine(sender, concurrency=50, retry=RetryPolicy(max_attempts=3, backoff_base=0.05),
                       ledger=ledger)


def msgs(n: int) -> list[Message]:
    return [Message(i, f"user{i}@example.com", f"<p.{i}@bulkmail.example>", {}) for i in range(n)]


def test_engine_pumps_pipeline_each_message_in_one_write(tmp_path: Path) -> None:
    with Fake() as fake:
        e = engine(tmp_path, fake.port, connections=2, max_per_connection=1000)
        counts = e.run(msgs(200))
        e.close()
    assert counts.sent == 200 and counts.retries == 0
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in msgs(200))
    assert fake.connections == 2
    # Every write but each connection's first and last carries a data, "." and the next MAIL.
    overlapped = [c for _, c in fake.chunks if b"\r\n.\r\nMAIL FROM:" in c]
    assert len(overlapped) >= 190


def test_broken_mid_overlap_retries_the_written_one_and_carries_the_next(tmp_path: Path) -> None:
    """The server drops the connection at the end of user3's data, when user4's commands came
    in the same write: user3 may have been delivered (transient, retried after a backoff), user4
    cannot have been (sent at once on a new connection, not an attempt). Each arrives once."""
    with Fake(drop={"user3@example.com": "data"}) as fake:
        e = engine(tmp_path, fake.port, connections=1, max_per_connection=1000)
        counts = e.run(msgs(10))
        e.close()
        e.ledger.flush()
    assert counts.sent == 10 and counts.retries == 1 and counts.attempts == 11
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in msgs(10))
    rows = read_journal(str(tmp_path / "run"))
    attempts = dict(zip(rows["id"].to_list(), rows["attempts"].to_list(), strict=True))
    assert attempts[3] == 2 and all(attempts[i] == 1 for i in range(10) if i != 3)
    assert e.sender.reconnects == 1


def test_a_composer_bug_fails_that_message_and_the_pump_goes_on(tmp_path: Path) -> None:
    """A message the composer raises on (here a field whose str() is not a str) is failed
    permanently; the ones before and after it on the same connection are sent."""
    class Bad:
        def __str__(self) -> Any:
            return 42  # str() raises TypeError inside the composer's own code

    batch = msgs(5)
    batch[2] = Message(2, "user2@example.com", "<p.2@bulkmail.example>", {"name": Bad()})
    with Fake() as fake:
        e = engine(tmp_path, fake.port, connections=1, max_per_connection=1000)
        counts = e.run(batch)
        e.close()
        e.ledger.flush()
    assert counts.sent == 4 and counts.failed == 1
    assert sorted(to for _, to, _ in fake.received) == [f"user{i}@example.com" for i in (0, 1, 3, 4)]
    rows = read_journal(str(tmp_path / "run"))
    failed = rows.filter(rows["status"] == "failed")
    assert failed["id"].to_list() == [2] and "message not built" in failed["error"][0]


def test_asend_pumps_start_on_demand_up_to_the_cap() -> None:
    with Fake() as fake:
        snd = AsyncSmtpSender(config(fake.port, max_per_connection=1000), COMPOSER,
                              local_hostname="client.example", max_connections=3)

        async def main() -> list[Any]:
            out = await asyncio.gather(*(snd.asend_envelope(env(i)) for i in range(30)))
            await snd.aclose()
            return out
        results = asyncio.run(main())
    assert all(r.ok for r in results) and fake.connections == snd.connections_opened == 3
    assert FROM in fake.received[0][2].decode()


def test_a_server_closing_after_a_reply_leaves_the_next_message_unattempted(tmp_path: Path) -> None:
    """The server answers user3's data and closes, user4's commands (in the same write) never
    answered: user4 cannot have been delivered, so it goes at once on a new connection and is
    not an attempt (no made-up refusal from the missing replies)."""
    with Fake(close_after={"user3@example.com"}) as fake:
        e = engine(tmp_path, fake.port, connections=1, max_per_connection=1000)
        counts = e.run(msgs(10))
        e.close()
    assert counts.sent == 10 and counts.attempts == 10 and counts.retries == 0
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in msgs(10))
    assert fake.connections == 2 and e.sender.reconnects == 1


class ClosingLimiter:
    """A global rate limit whose first turn comes after the server dropped the connection the
    pump had just opened for it."""

    def __init__(self, fake: Fake) -> None:
        self.fake, self.turns = fake, 0

    def wait(self) -> None:
        raise AssertionError("the async engine awaits its turns")

    async def await_turn(self) -> None:
        self.turns += 1
        if self.turns == 1:
            for w in list(self.fake.writers):
                self.fake.loop.call_soon_threadsafe(w.transport.abort)
            await asyncio.sleep(0.2)  # the client's loop sees the connection go meanwhile


def test_a_connection_closed_while_waiting_for_the_rate_is_replaced(tmp_path: Path) -> None:
    """Nothing was written on it: the message goes on a new connection, not as a failed attempt
    of a fresh connection (which would also take a relay out of rotation)."""
    with Fake() as fake:
        sender = AsyncSmtpSender(config(fake.port, max_per_connection=1000), COMPOSER,
                                 local_hostname="client.example", max_connections=1)
        ledger = LedgerWriter(str(tmp_path / "run"), writer="w", node="n", run="r", epoch=1)
        e = AsyncEngine(sender, concurrency=1, retry=RetryPolicy(max_attempts=3, backoff_base=0.05),
                        ledger=ledger, limiter=ClosingLimiter(fake))
        counts = e.run(msgs(6))
        e.close()
    assert counts.sent == 6 and counts.attempts == 6  # nothing was written on the dead one
    assert fake.connections == 2 and sorted(to for _, to, _ in fake.received) == sorted(
        m.to for m in msgs(6))


def test_pumps_waiting_at_a_relay_cap_hold_no_message(tmp_path: Path) -> None:
    """50 pumps, one relay down and the other capped at 2 connections: the pumps that find the
    cap give their messages back and wait holding nothing, and every message goes out on the
    capped relay, never more than 2 connections at once."""
    with Fake() as fake:
        down = free_port()  # nothing listens there: refused, out of rotation
        smtp = SmtpConfig(relays=(Relay(host="127.0.0.1", port=fake.port, max_connections=2),
                                  Relay(host="127.0.0.1", port=down)), timeout=5.0,
                          max_per_connection=1000)
        sender = AsyncSmtpSender(smtp, COMPOSER, local_hostname="client.example",
                                 max_connections=50)
        ledger = LedgerWriter(str(tmp_path / "run"), writer="w", node="n", run="r", epoch=1)
        e = AsyncEngine(sender, concurrency=50, retry=RetryPolicy(max_attempts=5, backoff_base=0.05),
                        ledger=ledger)
        done = threading.Event()
        result: list[Any] = []
        worker = threading.Thread(target=lambda: (result.append(e.run(msgs(300))), done.set()),
                                  daemon=True)
        worker.start()
        assert done.wait(30), "a batch waited on pumps that could not send"
        e.close()
    counts = result[0]
    assert counts.sent == 300 and counts.failed == 0
    assert sorted(to for _, to, _ in fake.received) == sorted(m.to for m in msgs(300))
    assert fake.most_open <= 2


def test_a_session_bug_on_the_overlapped_message_settles_it_and_the_pump_goes_on() -> None:
    """An envelope the sans-IO session raises on (no recipient), taken to follow another
    message's data: it fails alone (permanent, nothing of it was written), the message before
    it is delivered and the pump goes on with the next one."""
    bad = Envelope(FROM, None, b"Subject: x\r\n\r\nx\r\n", False)  # type: ignore[arg-type]
    with Fake() as fake:
        snd = AsyncSmtpSender(config(fake.port, max_per_connection=1000), COMPOSER,
                              local_hostname="client.example", max_connections=1)

        async def main() -> list[Any]:
            calls = [snd.asend_envelope(env(0)), snd.asend_envelope(bad),
                     snd.asend_envelope(env(2)), snd.asend_envelope(env(3))]
            out = await asyncio.wait_for(asyncio.gather(*calls), 10)
            await snd.aclose()
            return out
        results = asyncio.run(main())
    assert [r.status for r in results] == ["sent", "permanent", "sent", "sent"]
    assert "message not sendable: TypeError" in (results[1].error or "")
    assert sorted(to for _, to, _ in fake.received) == [f"user{i}@example.com" for i in (0, 2, 3)]
