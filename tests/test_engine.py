"""The engines inside one actor, without Ray: retries never hold a slot, stop abandons cleanly."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.config import RetryPolicy
from pipeline.ledger import LedgerWriter, read_journal
from pipeline.messages import Message
from pipeline.sending import SendResult
from pipeline.sending.aio import AsyncEngine
from pipeline.sending.engine import Engine
from pipeline.sending.fake import FakeSender
from pipeline.sending.threads import ThreadEngine


class FlakyOnce:
    """A real sender (not a mock): fails `flaky` ids once with a 421, sleeps `latency` otherwise."""

    def __init__(self, latency: float, flaky: set[int]) -> None:
        self.latency = latency
        self.flaky = set(flaky)
        self.lock = threading.Lock()

    def _verdict(self, m: Message) -> SendResult:
        with self.lock:
            if m.id in self.flaky:
                self.flaky.discard(m.id)
                return SendResult("transient", "421 busy")
        return SendResult("sent")

    def send(self, m: Message) -> SendResult:
        time.sleep(self.latency)
        return self._verdict(m)

    async def asend(self, m: Message) -> SendResult:
        await asyncio.sleep(self.latency)
        return self._verdict(m)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def messages(n: int) -> list[Message]:
    return [Message(i, f"u{i}@example.com", f"<t.{i}@example.com>", {}) for i in range(n)]


def make(kind: str, sender: object, tmp_path: Path, concurrency: int, **retry: float) -> Engine:
    writer = LedgerWriter(str(tmp_path), writer="w", node="n", run="r", flush_seconds=0)
    policy = RetryPolicy(max_attempts=int(retry.pop("max_attempts", 3)), **retry)
    cls = ThreadEngine if kind == "threads" else AsyncEngine
    return cls(sender, concurrency=concurrency, retry=policy, ledger=writer, seed=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_a_retry_waiting_for_its_backoff_does_not_hold_a_slot(kind: str, tmp_path: Path) -> None:
    # One worker. Message 0 fails once and must wait its backoff; with seed 4 the full-jitter
    # delay is the first uniform(0, 2.0) draw, checked here to be long enough to matter.
    delay = random.Random(4).uniform(0, 2.0)
    assert delay > 0.4
    engine = make(kind, FlakyOnce(0.01, {0}), tmp_path, 1, backoff_base=2.0, backoff_cap=2.0)
    counts = engine.run(messages(20))
    engine.ledger.flush()
    engine.close()
    assert (counts.sent, counts.retries) == (20, 1)
    led = read_journal(str(tmp_path)).sort("id")
    zero = led.row(0, named=True)
    assert zero["attempts"] == 2
    others_done = led.filter(pl.col("id") > 0)["finished_at"].max()
    # All 19 others went through the single worker while message 0 waited (about 0.2 s of work
    # against a longer backoff), so they finished before its second attempt started.
    assert others_done < zero["finished_at"]
    waited = (zero["finished_at"] - zero["started_at"]).total_seconds()
    assert waited >= delay


class Probe(FlakyOnce):
    """Counts sends in flight at once."""

    def __init__(self, latency: float) -> None:
        super().__init__(latency, set())
        self.now = 0
        self.peak = 0

    def _enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def _leave(self) -> None:
        with self.lock:
            self.now -= 1

    def send(self, m: Message) -> SendResult:
        self._enter()
        try:
            return super().send(m)
        finally:
            self._leave()

    async def asend(self, m: Message) -> SendResult:
        self._enter()
        try:
            return await super().asend(m)
        finally:
            self._leave()


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_pool_stays_full_across_batches(kind: str, tmp_path: Path) -> None:
    """Two batches of 15 on 10 workers (0.2 s each): one shared stream takes 3 waves (0.6 s);
    batch-by-batch waves take 4 (0.8 s, the second wave of each batch idles 5 workers); a pool
    per batch would exceed the concurrency of 10."""
    probe = Probe(0.2)
    engine = make(kind, probe, tmp_path, 10)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=engine.run, args=(messages(15),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    engine.close()
    assert probe.peak == 10
    assert elapsed < 0.75, elapsed


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_stop_finishes_in_flight_and_abandons_the_rest(kind: str, tmp_path: Path) -> None:
    engine = make(kind, FakeSender(latency=0.2), tmp_path, 5)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("c", engine.run(messages(100))))
    t.start()
    time.sleep(0.1)  # the first 5 are in flight
    engine.stop()
    t.join(timeout=5)
    assert not t.is_alive()
    engine.ledger.flush()
    engine.close()
    c = out["c"]
    assert c.sent == 5 and c.abandoned == 95
    led = read_journal(str(tmp_path))
    assert sorted(led["id"].to_list()) == [0, 1, 2, 3, 4]  # recorded: what really went out


def test_waiting_retries_are_abandoned_on_stop(tmp_path: Path) -> None:
    engine = make("threads", FlakyOnce(0.01, set(range(10))), tmp_path, 5,
                  backoff_base=30.0, backoff_cap=30.0)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("c", engine.run(messages(10))))
    t.start()
    time.sleep(0.3)  # all ten failed once and wait up to 30 s for their retry
    engine.stop()
    t.join(timeout=5)
    assert not t.is_alive(), "a stop waited for backoffs"
    engine.close()
    assert out["c"].abandoned >= 9  # (a zero-ish jitter draw may have retried one already)


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_should_stop_is_polled_while_a_batch_runs_and_between_short_batches(
        kind: str, tmp_path: Path) -> None:
    engine = make(kind, FakeSender(latency=0.05), tmp_path, 5)
    t0 = time.monotonic()

    def after_half_a_second() -> bool:
        return time.monotonic() - t0 > 0.5

    long = engine.run(messages(200), should_stop=after_half_a_second)  # 2 s of work
    assert 0 < long.sent < 100 and long.sent + long.abandoned == 200
    engine.close()
    # Batches far shorter than the poll interval still see the stop when they start.
    short_engine = make(kind, FakeSender(latency=0.001), tmp_path, 5)
    outcomes = [short_engine.run(messages(3), should_stop=lambda: True) for _ in range(3)]
    short_engine.close()
    assert all(c.abandoned == 3 for c in outcomes)
