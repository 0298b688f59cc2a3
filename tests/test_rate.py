"""The global rate limit (--rate): the slot schedule alone, then whole runs on real Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from pipeline.campaign import run_campaign
from pipeline.config import RetryPolicy
from pipeline.ledger import LedgerWriter
from pipeline.messages import Message
from pipeline.sending.aio import AsyncEngine
from pipeline.sending.fake import FakeSender
from pipeline.sending.ratelimit import SlotLimiter, SlotSchedule, estimate_offset
from pipeline.sending.threads import ThreadEngine

from .conftest import campaign, read_ledger, run_then_stop, write_recipients
from .pacing import all_sending, check_paced, per_second


def test_schedule_grants_each_slot_once_spaced_and_ahead() -> None:
    now = [1000.0]
    s = SlotSchedule(100, lead=0.05, horizon=1.0, clock=lambda: now[0])
    a, _ = s.grant(10)
    b, _ = s.grant(5)
    assert a == pytest.approx([1000.05 + i * 0.01 for i in range(10)])
    assert b == pytest.approx([1000.15 + i * 0.01 for i in range(5)])  # right after a
    # Nothing beyond the horizon: 1 s at 100/s is 100 slots; 15 are out, 0.05 s is lead.
    c, _ = s.grant(500)
    assert len(c) == 100 - 15 - 5
    full, retry_at = s.grant(1)
    assert full == [] and retry_at > now[0]
    now[0] = retry_at
    assert len(s.grant(1)[0]) == 1
    # Given-back slots go to the next asker first, unless too close to be delivered in time.
    s.release([1000.20, 1000.21, 1000.50])
    now[0] = 1000.3
    again, _ = s.grant(1)
    assert again == [pytest.approx(1000.50)]
    # After a quiet spell slots start from now (plus lead), not in the past.
    now[0] += 60
    assert s.grant(3)[0][0] == pytest.approx(now[0] + 0.05)
    # An asker's own lead, never beyond the schedule's.
    now[0] += 60
    assert s.grant(1, 0.01)[0][0] == pytest.approx(now[0] + 0.01)
    now[0] += 60
    assert s.grant(1, 1.0)[0][0] == pytest.approx(now[0] + 0.05)
    granted = a + b + c
    assert len(set(granted)) == len(granted)


def test_clock_offset_to_the_schedule_is_measured() -> None:
    # A node whose clock is 5 s behind the schedule's, round trips of 2-30 ms.
    delays = iter([0.030, 0.002, 0.015, 0.020, 0.010])
    now = [100.0]

    def local() -> float:
        return now[0]

    def remote_now() -> float:
        d = next(delays)
        now[0] += d / 2
        answer = now[0] + 5.0
        now[0] += d / 2
        return answer
    assert estimate_offset(remote_now, clock=local) == pytest.approx(5.0, abs=0.001)


def test_limiter_paces_threads_and_coroutines_of_several_actors() -> None:
    schedule = SlotSchedule(400)
    lock = threading.Lock()
    calls = [0]

    def grant(n: int, lead: float | None) -> tuple[list[float], float]:
        with lock:  # the actor handles one call at a time
            calls[0] += 1
            time.sleep(0.002)  # a round trip
            return schedule.grant(n, lead)

    def release(slots: list[float]) -> None:
        with lock:
            schedule.release(slots)
    starts: list[float] = []
    limiters = [SlotLimiter(grant, release=release, max_chunk=40) for _ in range(3)]

    running = {0: 20, 1: 20}

    def worker(i: int) -> None:
        limiter = limiters[i % 2]
        for _ in range(30):
            limiter.wait()
            starts.append(time.time())
            time.sleep(0.01)
        with lock:
            running[i % 2] -= 1
            idle = running[i % 2] == 0
        if idle:  # as SendBatches does when its work runs out
            limiter.give_back()

    async def coroutines(limiter: SlotLimiter) -> None:
        async def one() -> None:
            for _ in range(30):
                await limiter.await_turn()
                starts.append(time.time())
                await asyncio.sleep(0.01)
        await asyncio.gather(*(one() for _ in range(20)))
        limiter.give_back()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    threads.append(threading.Thread(target=asyncio.run, args=(coroutines(limiters[2]),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert len(starts) == 40 * 30 + 20 * 30
    windows = check_paced(starts, 400)
    assert len(windows) >= 3
    # Slots come in chunks: far fewer round trips than emails.
    assert calls[0] < len(starts) / 5


def test_a_binding_rate_is_reached_by_just_enough_connections() -> None:
    """10 connections (2 actors × 5) of 50 ms sends could start 200 a second: a rate of 100
    binds, and every worker waits for a slot after each send. That wait's floor is the lead of
    the slots it is granted: at the schedule's 50 ms it held them to 81-86 a second (CI once
    failed the relays' rate test on it); at the lead the limiter asks for (twice its round
    trip of about 2 ms here, so the 5 ms floor) they reach the rate. Checked on the mean of the
    full seconds, so that one stall of a loaded machine does not decide it."""
    schedule = SlotSchedule(100)
    lock = threading.Lock()
    leads: list[float | None] = []

    def grant(n: int, lead: float | None) -> tuple[list[float], float]:
        with lock:
            leads.append(lead)
            time.sleep(0.002)
            return schedule.grant(n, lead)
    limiters = [SlotLimiter(grant, max_chunk=100) for _ in range(2)]
    starts: list[float] = []
    end = time.time() + 6

    def worker(limiter: SlotLimiter) -> None:
        while time.time() < end:
            limiter.wait()
            starts.append(time.time())
            time.sleep(0.05)
    threads = [threading.Thread(target=worker, args=(limiters[i % 2],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for limiter in limiters:
        limiter.cancel()
    windows = per_second(starts)
    assert len(windows) >= 4 and max(windows) <= 110, windows
    assert sum(windows) / len(windows) >= 95, windows
    asked = sorted(x for x in leads if x is not None)
    assert asked and asked[len(asked) // 2] < 0.02, asked  # the measured lead, not 50 ms


def test_cancel_wakes_waiters_at_once() -> None:
    schedule = SlotSchedule(1, horizon=100)  # one slot a second: everybody waits
    limiter = SlotLimiter(schedule.grant, max_chunk=100)
    done: list[float] = []

    def worker() -> None:
        limiter.wait()
        done.append(time.time())
    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.time()
    limiter.cancel()
    for t in threads:
        t.join(timeout=5)
    assert len(done) == 10 and max(done) - t0 < 0.5


def test_a_thread_still_gets_a_slot_when_the_ones_granted_were_stale_on_arrival() -> None:
    """A grant that arrives too late to use (a starved process: the slots are past `late_ok`)
    is dropped, and the helper must then ask again. It once did not: the waiting thread dropped
    the stale slots and slept, the helper slept too (it had just filled the deque), and the
    last batch of a run hung for good (seen once in the suite, after an actor was killed)."""
    calls: list[int] = []

    def grant(n: int, lead: float | None) -> tuple[list[float], float]:
        calls.append(n)
        now = time.time()
        if len(calls) == 1:
            return [now - 1.0, now - 1.0], now  # two slots, both stale by the time they land
        return [now + 0.01] * n, now

    limiter = SlotLimiter(grant, max_chunk=10)
    waiter = threading.Thread(target=limiter.wait, daemon=True)
    waiter.start()
    waiter.join(timeout=5)
    alive = waiter.is_alive()
    limiter.cancel()
    assert not alive, "the waiting thread never got a slot"
    assert len(calls) == 2 and limiter.slots_dropped == 2


def test_a_slot_a_later_thread_takes_first_is_asked_for_again() -> None:
    """A thread woken for a granted slot may find that a thread which came later took it first:
    the deque is empty again while the helper, which counted that slot as the woken thread's,
    sleeps. It once slept for good, and so did the woken thread (the pacing test above hung
    once in the suite, 2 cores under load). The woken thread that has not run yet is set up
    here as what the limiter sees of it: one waiter counted, the slot in the deque."""
    calls: list[int] = []

    def grant(n: int, lead: float | None) -> tuple[list[float], float]:
        calls.append(n)
        now = time.time()
        return [now + 0.01] * n, now

    limiter = SlotLimiter(grant, max_chunk=10)
    limiter.wait()  # the helper is up, has granted one slot and sleeps: nothing is wanted
    with limiter._cv:
        assert calls == [1] and not limiter._slots and limiter._reserve() == 0
        limiter._hungry += 1  # woken, not yet run
        limiter._slots.append(time.time() + 0.01)  # the slot it was woken for
    limiter.wait()  # the later thread takes it
    deadline = time.time() + 5
    while len(calls) < 2 and time.time() < deadline:
        time.sleep(0.01)
    limiter.cancel()
    assert len(calls) == 2, "the helper slept while a waiting thread had no slot"


@pytest.mark.parametrize("mode", ["threads", "async"])
def test_stop_abandons_messages_waiting_for_a_slot_instead_of_sending_them(
        tmp_path: Path, mode: str) -> None:
    schedule = SlotSchedule(2, lead=0.0, horizon=100)  # 2 a second: most wait a long time
    limiter = SlotLimiter(schedule.grant, release=schedule.release, max_chunk=50)
    log = tmp_path / "sends.log"
    sender = FakeSender(latency=0.0, send_log=str(log))
    writer = LedgerWriter(str(tmp_path / "run"), writer="w", node="n", run="r", flush_seconds=0)
    engine_cls = ThreadEngine if mode == "threads" else AsyncEngine
    engine = engine_cls(sender, concurrency=20, retry=RetryPolicy(), ledger=writer,  # type: ignore[arg-type]
                        limiter=limiter)
    messages = [Message(i, f"u{i}@example.com", f"<{i}@x>", {}) for i in range(20)]
    counts = run_then_stop(engine, messages)
    sent = log.read_text().split() if log.exists() else []
    assert counts.sent == len(sent) <= 4  # only the slots that came due before the stop
    assert counts.sent + counts.abandoned == 20
    engine.close()


def _check_rate(led: pl.DataFrame, rate: float) -> list[int]:
    starts = sorted(t.timestamp() for t in led["started_at"].to_list())
    windows = check_paced(starts, rate, since=all_sending(led))
    overall = (len(starts) - 1) / (starts[-1] - starts[0])
    assert overall == pytest.approx(rate, rel=0.02)
    return windows


@pytest.mark.usefixtures("ray_session")
# One actor is the easy case of one schedule; four (threads) and two (async) share it.
@pytest.mark.parametrize("actors, mode, seconds", [(4, "threads", 20), (2, "async", 8)])
def test_rate_200_holds_in_every_second_with_one_or_four_actors(
        tmp_path: Path, actors: int, mode: str, seconds: int) -> None:
    rate = 200
    path = write_recipients(tmp_path / "in.parquet", rate * seconds)
    # Without the limit these actors would send 1,000/s each (20 workers at 0.02 s).
    rep = run_campaign(campaign(tmp_path, path, actors=actors, threads_per_actor=20,
                                concurrency_per_actor=20, mode=mode, latency=0.02, rate=rate))
    led = read_ledger(tmp_path)
    assert led.height == rate * seconds and (led["status"] == "sent").all()
    windows = _check_rate(led, rate)
    assert len(windows) >= seconds - 3
    assert led["actor"].n_unique() == actors
    assert rep.config.rate == rate


def _kill_one_sender_after(log: Path, sends: int, killed: list[int]) -> threading.Thread:
    """SIGKILL one sender actor process (under this test session's Ray, whose processes
    descend from this one) once `sends` emails are logged."""

    def kill() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if log.exists() and log.read_bytes().count(b"\n") >= sends:
                break
            time.sleep(0.05)
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if "SendBatches" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            except psutil.Error:
                continue
    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


@pytest.mark.usefixtures("ray_session")
def test_rate_holds_when_a_sender_actor_is_killed_and_restarted(tmp_path: Path) -> None:
    rate, rows = 200, 2400
    path = write_recipients(tmp_path / "in.parquet", rows)
    log = tmp_path / "sends.log"
    killed: list[int] = []
    killer = _kill_one_sender_after(log, 1000, killed)
    rep = run_campaign(campaign(tmp_path, path, actors=4, threads_per_actor=20, latency=0.02,
                                rate=rate, send_log=str(log)))
    killer.join(timeout=1)
    assert killed, "no sender actor process was found to kill"
    assert rep.send.crashed_batches >= 1  # its batch was tried again
    led = read_ledger(tmp_path)
    assert led.height == rows and led["id"].n_unique() == rows
    starts = sorted(t.timestamp() for t in led["started_at"].to_list())
    windows = per_second(starts)
    # Never over the limit: the restarted actor asks the same schedule for new slots. (The
    # slots the dead one held are lost, so a second may fall short; none may go over.)
    assert max(windows) <= rate * 1.1, f"per-second counts {windows}"
    overall = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate * 0.9 <= overall <= rate * 1.02
