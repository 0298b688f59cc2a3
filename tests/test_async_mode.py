"""`--mode async` passes the same end-to-end checks as the threaded mode: every recipient exactly
once in the ledger, failures and retries recorded as the fake sender's seeded model predicts.
Plus the async engine alone: a stop abandons what has not started, the pool never exceeds its
concurrency, and the vectorised message building matches the per-row definitions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline import RetryPolicy, ledger
from pipeline.campaign import run_campaign
from pipeline.messages import Message, from_batch, id_domain, message_id
from pipeline.sending import SendResult
from pipeline.sending.aio import AsyncEngine
from pipeline.sending.fake import FakeSender, fake_outcome

from .conftest import campaign, read_ledger, write_recipients

ASYNC = dict(mode="async", actors=2, concurrency_per_actor=200)


def flaky_streak(seed: int, rid: int, fail_rate: float) -> int:
    """How many first attempts of `rid` fail transiently under the fake sender's model."""
    n = 0
    while not fake_outcome(seed, rid, n + 1, fail_rate=fail_rate, permanent_fail_rate=0).ok:
        n += 1
    return n


@pytest.mark.usefixtures("ray_session")
def test_every_recipient_exactly_once(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 3000)
    rep = run_campaign(campaign(tmp_path, path, **ASYNC))
    led = read_ledger(tmp_path)
    assert sorted(led["id"].to_list()) == list(range(3000))
    assert (led["status"] == "sent").all() and (led["attempts"] == 1).all()
    assert led["actor"].n_unique() == 2
    # The journal too holds each recipient once: no batch was sent twice.
    journal = ledger.read_journal(str(tmp_path / "runs" / "test"))
    assert journal.filter(pl.col("status") == "sent")["id"].n_unique() == journal.filter(
        pl.col("status") == "sent").height == 3000
    domain = id_domain("bulkmail <noreply@bulkmail.invalid>")
    assert led["message_id"].to_list() == [message_id("test", i, domain) for i in range(3000)]
    assert rep.config.mode == "async" and rep.config.total_concurrency == 400
    assert rep.counts.sent == 3000 and rep.counts.reconciled
    assert rep.send.repeated_records == 0


@pytest.mark.usefixtures("ray_session")
def test_transient_failures_without_retries_fail_the_predicted_recipients(tmp_path: Path) -> None:
    rows = 2000
    path = write_recipients(tmp_path / "in.parquet", rows)
    rep = run_campaign(campaign(tmp_path, path, fail_rate=0.2, seed=7,
                                retry=RetryPolicy(max_attempts=1), **ASYNC))
    led = read_ledger(tmp_path)
    expected = {i for i in range(rows) if flaky_streak(7, i, 0.2)}
    failed = led.filter(pl.col("status") == "failed")
    assert set(failed["id"].to_list()) == expected
    assert 300 < len(expected) < 500
    assert failed["error"].str.contains("421").all()
    assert (led["attempts"] == 1).all()
    c = rep.counts
    assert c.sent + c.failed == rows and c.failed == len(expected) and c.reconciled


@pytest.mark.usefixtures("ray_session")
def test_retries_and_permanent_failures_recorded(tmp_path: Path) -> None:
    rows, seed = 2000, 11
    path = write_recipients(tmp_path / "in.parquet", rows)
    rep = run_campaign(campaign(
        tmp_path, path, fail_rate=0.3, permanent_fail_rate=0.05, seed=seed,
        retry=RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.05), **ASYNC))
    led = read_ledger(tmp_path).sort("id")
    assert led["id"].to_list() == list(range(rows))
    permanent = {i for i in range(rows)
                 if fake_outcome(seed, i, 1, fail_rate=0, permanent_fail_rate=0.05).status == "permanent"}
    expected: dict[int, tuple[str, int]] = {}
    for i in range(rows):
        if i in permanent:
            expected[i] = ("failed", 1)  # a 550 is never retried
        else:
            streak = flaky_streak(seed, i, 0.3)  # 0..3 transient failures first
            expected[i] = ("sent", streak + 1) if streak < 3 else ("failed", 3)
    got = {r["id"]: (r["status"], r["attempts"]) for r in led.iter_rows(named=True)}
    assert got == expected
    assert {s for s, a in expected.values() if a > 1} == {"sent", "failed"}  # both kinds occur
    failed = led.filter(pl.col("status") == "failed")
    assert failed.filter(pl.col("id").is_in(list(permanent)))["error"].str.contains("550").all()
    assert failed.filter(~pl.col("id").is_in(list(permanent)))["error"].str.contains("421").all()
    assert rep.send.retries == sum(a - 1 for _, a in expected.values())
    assert rep.counts.reconciled


# --------------------------------------------------------------------------- the engine alone

class CountingSender:
    """An AsyncSender that waits `latency` and records how many sends overlap."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.now = 0
        self.peak = 0
        self.sent: list[int] = []

    async def asend(self, message: Message) -> SendResult:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(self.latency)
        self.now -= 1
        self.sent.append(message.id)
        return SendResult("sent")

    async def aclose(self) -> None:
        pass


def messages(start: int, n: int) -> list[Message]:
    return [Message(i, f"u{i}@example.com", f"<t.{i}@x>", {}) for i in range(start, start + n)]


def test_engine_bounds_concurrency_and_records_each_once_across_batches(tmp_path: Path) -> None:
    sender = CountingSender(latency=0.01)
    w = ledger.LedgerWriter(str(tmp_path), writer="a", node="n", run="r", flush_seconds=0)
    engine = AsyncEngine(sender, concurrency=50, retry=RetryPolicy(), ledger=w)
    results = []
    # Three batches at once from three threads, as Ray Data's concurrent calls do.
    threads = [threading.Thread(target=lambda k=k: results.append(engine.run(messages(k * 700, 700))))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    w.close()
    assert sorted(c.sent for c in results) == [700, 700, 700]
    assert sorted(sender.sent) == list(range(2100))
    assert sender.peak == 50  # the pool was full, never more
    assert sorted(ledger.read_journal(str(tmp_path))["id"].to_list()) == list(range(2100))


def test_stop_abandons_queued_and_delayed_sends_and_records_the_rest(tmp_path: Path) -> None:
    sender = FakeSender(latency=0.02, fail_rate=0.5, seed=1)
    w = ledger.LedgerWriter(str(tmp_path), writer="a", node="n", run="r", flush_seconds=0)
    # Long backoffs: every retried recipient is waiting in the delay queue when the stop comes,
    # and run() can only return soon if the stop abandons those waits at once.
    engine = AsyncEngine(sender, concurrency=20, ledger=w,
                         retry=RetryPolicy(max_attempts=4, backoff_base=60.0, backoff_cap=60.0))
    out = []
    t = threading.Thread(target=lambda: out.append(engine.run(messages(0, 2000))))
    t.start()
    time.sleep(0.3)
    before = w.pending()  # outcomes recorded so far (nothing flushes on its own here)
    engine.stop()
    t.join(timeout=20)
    assert not t.is_alive(), "run() must return after a stop"
    engine.close()
    w.close()
    counts = out[0]
    recorded = ledger.read_journal(str(tmp_path))
    assert counts.sent + counts.failed + counts.abandoned == 2000
    assert counts.abandoned > 1000  # the queue and the delayed retries
    assert recorded.height == counts.sent + counts.failed
    assert recorded["id"].n_unique() == recorded.height
    # After the stop only the sends already under way (at most the 20 workers) finish; the
    # queue and the retries waiting out their backoff are not sent.
    assert 0 < before <= recorded.height <= before + 20


def test_vectorised_messages_match_the_per_row_definitions() -> None:
    frame = pl.DataFrame({"id": [5, 6, 7, 8], "email": ["a@x.org", "b@x.org", "c@x.org", "d@x.org"],
                          "name": ["Ada", "Bo", None, "Di"], "plan": ["pro", "free", "pro", "team"],
                          "extra": [1, 2, 3, 4]})
    msgs = from_batch(frame.to_arrow(), campaign="camp.1", domain="example.org",
                      fields=("name", "plan", "missing"), skip={6})
    assert [m.id for m in msgs] == [5, 7, 8]
    assert [m.to for m in msgs] == ["a@x.org", "c@x.org", "d@x.org"]
    assert [m.message_id for m in msgs] == [message_id("camp.1", i, "example.org") for i in (5, 7, 8)]
    assert [dict(m.fields) for m in msgs] == [{"name": "Ada", "plan": "pro"},
                                              {"name": None, "plan": "pro"},
                                              {"name": "Di", "plan": "team"}]
    assert msgs[0].fields.get("missing") is None and "extra" not in msgs[0].fields
    assert {**msgs[2].fields, "id": 8} == {"name": "Di", "plan": "team", "id": 8}
