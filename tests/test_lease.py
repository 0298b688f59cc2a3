"""The campaign lease (pipeline/lease.py): real files in tmp dirs, a real moto S3 server.

Time is injected (a settable clock) wherever a test is about expiry, so nothing sleeps for a ttl;
the heartbeat tests use a 0.4 s ttl. Races use real processes on one run directory.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from pipeline import lease as lease_mod
from pipeline import lease_store
from pipeline.errors import BulkmailError, UsageError
from pipeline.lease import DEFAULT_TTL, Holder, Lease, LeaseHeld, LeaseLost, read_holder

from .conftest import S3_BUCKET

BUCKET = S3_BUCKET
HOST = socket.gethostname()


# --- fixtures: moto's S3 server on loopback (as tests/test_s3.py), or a local directory --------

@pytest.fixture
def s3_run_dir(s3: Any) -> str:
    return f"s3://{BUCKET}/runs/{uuid.uuid4().hex}/campaign"


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_run_dir"))
    return str(tmp_path / "runs" / "campaign")


def _s3_client() -> Any:
    # A fresh session: boto3's default one keeps the profile settings it first saw.
    return boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                                          region_name="us-east-1")


def _epoch_names(run_dir: str) -> list[str]:
    """The lease directory's epoch files, read without the module under test."""
    if run_dir.startswith("s3://"):
        prefix = run_dir[len(f"s3://{BUCKET}/"):] + "/lease/"
        reply = _s3_client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(obj["Key"][len(prefix):] for obj in reply.get("Contents", []))
    directory = Path(run_dir) / "lease"
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _raw(run_dir: str, epoch: int) -> bytes:
    name = f"{epoch:012d}.json"
    if run_dir.startswith("s3://"):
        key = run_dir[len(f"s3://{BUCKET}/"):] + "/lease/" + name
        return bytes(_s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    return (Path(run_dir) / "lease" / name).read_bytes()


class Clock:
    """A clock the test sets by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _later(seconds: float) -> Callable[[], float]:
    """The real clock, run ahead: how a taker sees a holder that fell silent `seconds` ago."""
    return lambda: time.time() + seconds


# --- acquire, held, release ---------------------------------------------------------------

def test_second_acquire_is_refused_naming_the_holder(run_dir: str) -> None:
    clock = Clock(1_800_000_000.0)
    first = Lease.acquire(run_dir, run_id="20270115T080000-111", clock=clock)
    assert first.epoch == 1 and first.valid()
    clock.now += 2.0
    with pytest.raises(LeaseHeld) as info:
        Lease.acquire(run_dir, run_id="20270115T080002-222", clock=clock)
    err = info.value
    assert isinstance(err, UsageError)
    assert err.holder.run_id == "20270115T080000-111" and err.holder.epoch == 1
    assert err.holder.pid == os.getpid() and err.holder.host == HOST
    message = str(err)
    assert "\n" not in message and "already running" in message
    assert f"run 20270115T080000-111 (pid {os.getpid()} on host {HOST})" in message
    assert f"kill {os.getpid()} on {HOST}" in message
    assert "last heartbeat 2.0 s ago" in message and "wait up to 8 s" in message
    assert _epoch_names(run_dir) == ["000000000001.json"]   # the refused run wrote nothing
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == message and copy.holder == err.holder


def test_release_lets_the_next_run_take_the_next_epoch(run_dir: str) -> None:
    with Lease.acquire(run_dir, run_id="first") as first:
        assert first.valid()
    assert not first.valid()
    holder = read_holder(run_dir)
    assert holder is not None and holder.released and holder.run_id == "first"
    second = Lease.acquire(run_dir, run_id="second")   # at once, though the heartbeat is fresh
    assert second.epoch == 2 and second.valid()
    holder = read_holder(run_dir)
    assert holder is not None and holder.run_id == "second" and not holder.released
    first.release()   # twice is harmless, and does not touch the new holder
    assert read_holder(run_dir) == holder


def test_expiry_by_the_clock_and_the_holder_stops_before_a_taker_may_start(run_dir: str) -> None:
    ttl = 10.0
    holder_clock, taker_clock = Clock(1000.0), Clock(1000.0)
    first = Lease.acquire(run_dir, run_id="first", ttl=ttl, clock=holder_clock)
    assert first.valid_until == 1000.0 + ttl - ttl / 4
    holder_clock.now = first.valid_until
    assert not first.valid()              # the holder gives up at heartbeat + ttl - margin ...
    taker_clock.now = 1000.0 + ttl
    with pytest.raises(LeaseHeld):        # ... while a taker must wait for heartbeat + ttl
        Lease.acquire(run_dir, run_id="taker", clock=taker_clock)
    taker_clock.now = 1000.0 + ttl + 0.01
    taker = Lease.acquire(run_dir, run_id="taker", clock=taker_clock)
    assert taker.epoch == 2
    holder = read_holder(run_dir)
    assert holder is not None and holder.run_id == "taker"


def test_renew_and_release_after_a_takeover_leave_the_taker_alone(run_dir: str) -> None:
    holder_clock = Clock(1000.0)
    first = Lease.acquire(run_dir, run_id="first", clock=holder_clock)
    # The taker's clock says first expired; first's own clock says it is still in time (as if
    # first had been paused, or the clocks disagreed by more than the stated margin).
    taker = Lease.acquire(run_dir, run_id="taker", clock=Clock(1000.0 + DEFAULT_TTL + 1))
    taken = _raw(run_dir, taker.epoch)
    holder_clock.now = 1001.0
    with pytest.raises(LeaseLost) as info:
        first.renew()
    assert info.value.taker is not None and info.value.taker.run_id == "taker"
    assert "taken over by run taker" in str(info.value)
    assert not first.valid()
    with pytest.raises(LeaseLost):
        first.renew()                      # stays lost
    first.release()
    assert _raw(run_dir, taker.epoch) == taken
    assert json.loads(_raw(run_dir, first.epoch))["released"] is False   # lost, not released
    holder = read_holder(run_dir)
    assert holder is not None and holder.run_id == "taker" and not holder.released


def test_release_after_an_unnoticed_takeover_writes_nothing(run_dir: str) -> None:
    first = Lease.acquire(run_dir, run_id="first", clock=Clock(1000.0))
    Lease.acquire(run_dir, run_id="taker", clock=Clock(1000.0 + DEFAULT_TTL + 1))
    before = [_raw(run_dir, 1), _raw(run_dir, 2)]
    first.release()   # no renew in between: first has not yet learnt it lost the lease
    assert [_raw(run_dir, 1), _raw(run_dir, 2)] == before
    assert not first.valid()


def test_a_create_whose_success_was_not_reported_still_wins(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # As when S3 (or NFS) applied a create but the reply was lost, and the SDK's retry was
    # refused because the object now exists: the file is ours, so the lease is ours.
    create = lease_store._LocalStore.create

    def reply_lost(self: Any, epoch: int, data: bytes) -> bool:
        assert create(self, epoch, data)
        return False

    monkeypatch.setattr(lease_store._LocalStore, "create", reply_lost)
    lease = Lease.acquire(str(tmp_path), run_id="r")
    assert lease.epoch == 1 and lease.valid()
    assert _epoch_names(str(tmp_path)) == ["000000000001.json"]


def test_renew_moves_the_heartbeat_and_a_lapsed_lease_takes_a_fresh_epoch(run_dir: str) -> None:
    clock = Clock(1000.0)
    lease = Lease.acquire(run_dir, run_id="r", clock=clock)
    clock.now = 1002.0
    lease.renew()
    assert lease.epoch == 1 and lease.valid_until == 1002.0 + DEFAULT_TTL * 0.75
    assert json.loads(_raw(run_dir, 1))["heartbeat_at"] == 1002.0
    # Paused past valid_until (but not yet past the taker's deadline): the old epoch could be
    # judged expired by a taker that read it earlier, so it is not extended; a new one is taken.
    clock.now = 1010.0
    assert not lease.valid()
    lease.renew()
    assert lease.epoch == 2 and lease.valid() and lease.valid_until == 1010.0 + DEFAULT_TTL * 0.75
    holder = read_holder(run_dir)
    assert holder is not None and holder.epoch == 2 and holder.run_id == "r"


def test_read_holder(run_dir: str) -> None:
    assert read_holder(run_dir) is None
    clock = Clock(1_796_119_810.0)   # 2026-12-01 10:10:10 UTC
    lease = Lease.acquire(run_dir, run_id="20261201T101010-123", ttl=6.0, clock=clock)
    holder = read_holder(run_dir)
    assert holder == Holder(host=HOST, pid=os.getpid(), run_id="20261201T101010-123",
                            started_at=clock.now, heartbeat_at=clock.now, ttl_s=6.0, epoch=1,
                            released=False)
    assert holder.expires_in(clock.now + 2.5) == 3.5
    assert holder.describe(clock.now + 2.1) == (
        f"run 20261201T101010-123 (pid {os.getpid()} on host {HOST}), "
        "started 2026-12-01 10:10:10 UTC, last heartbeat 2.1 s ago")
    lease.release()
    released = read_holder(run_dir)
    assert released is not None and released.released and released.describe().endswith("released")


def test_old_epochs_are_pruned_keeping_the_newest_three(run_dir: str) -> None:
    for _ in range(5):
        Lease.acquire(run_dir, run_id="r").release()
    assert _epoch_names(run_dir) == [f"{e:012d}.json" for e in (3, 4, 5)]


# --- who counts as gone ---------------------------------------------------------------------

_HOLD = r"""
import socket, sys
from pipeline.lease import Lease
if sys.argv[2] != "-":
    socket.gethostname = lambda: sys.argv[2]
lease = Lease.acquire(sys.argv[1], run_id="child")
print(lease.epoch, flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()      # until the parent closes our stdin
    lease.release()
    print("lost" if not lease.valid() else "still valid", flush=True)
"""


def _holder_process(run_dir: str, *, host: str = "-", hold: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, run_dir, host, "hold" if hold else "exit"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "1"
    return proc


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    proc = _holder_process(run_dir, hold=False)
    assert proc.wait(timeout=20) == 0   # died without releasing
    holder = read_holder(run_dir)
    assert holder is not None and holder.pid == proc.pid and not holder.released
    lease = Lease.acquire(run_dir, run_id="parent")   # real clock: its heartbeat is fresh
    assert lease.epoch == 2


def test_a_live_holder_on_this_host_is_not_taken_over_before_expiry(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    proc = _holder_process(run_dir, hold=True)
    try:
        with pytest.raises(LeaseHeld) as info:
            Lease.acquire(run_dir, run_id="parent")
        assert info.value.holder.pid == proc.pid and f"kill {proc.pid} on {HOST}" in str(info.value)
        # Alive but silent past its ttl (hung, or its heartbeat cannot reach the disk): expired.
        lease = Lease.acquire(run_dir, run_id="parent", clock=_later(DEFAULT_TTL + 0.5))
        assert lease.epoch == 2
        mine = _raw(run_dir, 2)
        out, _ = proc.communicate("", timeout=20)   # the child releases after the takeover
        assert proc.returncode == 0 and out.strip() == "lost"
        assert _raw(run_dir, 2) == mine             # and did not touch our epoch
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_holder_on_another_host_is_only_taken_over_after_expiry(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    proc = _holder_process(run_dir, host="other-host", hold=False)
    assert proc.wait(timeout=20) == 0   # dead, but its pid means nothing on another host
    with pytest.raises(LeaseHeld) as info:
        Lease.acquire(run_dir, run_id="parent")
    assert "on host other-host" in str(info.value) and "wait up to 10 s" in str(info.value)
    assert Lease.acquire(run_dir, run_id="parent", clock=_later(DEFAULT_TTL + 0.5)).epoch == 2


# --- races: exactly one winner ----------------------------------------------------------------

_RACER = r"""
import json, os, sys, time
from pipeline import lease as L, lease_store as S
run_dir = sys.argv[1]
L.read_holder(run_dir)   # warm up imports (and, for S3, botocore's model files)
out = {"pid": os.getpid(), "saw_empty": None, "create_failed": 0}

# Widen the race on purpose: every racer lists the (empty) lease directory, then waits until a
# common instant before creating, so all of them try to create epoch 1 together.
for cls in (S._LocalStore, S._S3Store):
    def patch(cls=cls, epochs=cls.epochs, create=cls.create):
        def slow_epochs(self):
            found = epochs(self)
            if out["saw_empty"] is None:
                out["saw_empty"] = not found
                time.sleep(max(0.0, deadline - time.time()))
            return found
        def counted_create(self, epoch, data):
            ok = create(self, epoch, data)
            out["create_failed"] += not ok
            return ok
        cls.epochs, cls.create = slow_epochs, counted_create
    patch()

print("ready", flush=True)
deadline = float(sys.stdin.readline())
try:
    lease = L.Lease.acquire(run_dir, run_id=f"racer-{os.getpid()}")
    out["won"] = lease.epoch
except L.LeaseHeld as e:
    out["held_by"] = e.holder.pid
print(json.dumps(out), flush=True)
sys.stdin.read()
if "won" in out:
    lease.release()
"""


@pytest.mark.timeout(60)
def test_racing_processes_exactly_one_wins(run_dir: str) -> None:
    # Fewer racers against S3: each one spends ~0.5 s of CPU importing boto3 and building a
    # client, on a 2-core machine (the thread race below puts 8 against S3).
    racers = 6 if run_dir.startswith("s3://") else 8
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, run_dir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(racers)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 1.0
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{deadline}\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs if proc.stdout]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        assert [proc.wait(timeout=20) for proc in procs] == [0] * racers
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    winners = [r for r in results if "won" in r]
    assert len(winners) == 1 and winners[0]["won"] == 1, results
    losers = [r for r in results if "won" not in r]
    assert all(r["held_by"] == winners[0]["pid"] for r in losers), results
    # The race was real: losers that saw no lease at all were stopped by the exclusive create.
    collided = [r for r in losers if r["saw_empty"]]
    assert len(collided) >= 2 and all(r["create_failed"] >= 1 for r in collided), results
    assert _epoch_names(run_dir) == ["000000000001.json"]
    holder = read_holder(run_dir)
    assert holder is not None and holder.released and holder.pid == winners[0]["pid"]


def test_racing_threads_exactly_one_wins(run_dir: str) -> None:
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def race(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(Lease.acquire(run_dir, run_id=f"thread-{i}"))
        except LeaseHeld as e:
            outcomes.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    won = [o for o in outcomes if isinstance(o, Lease)]
    assert len(outcomes) == 8 and len(won) == 1 and won[0].epoch == 1
    assert {o.holder.run_id for o in outcomes if isinstance(o, LeaseHeld)} == {won[0].run_id}


# --- the heartbeat --------------------------------------------------------------------------

def test_heartbeat_keeps_the_lease_then_reports_a_takeover_once(run_dir: str) -> None:
    ttl = 0.4
    lease = Lease.acquire(run_dir, run_id="beating", ttl=ttl)
    lost: list[BaseException] = []
    lost_event = threading.Event()
    renewed: list[float] = []

    def on_lost(e: BaseException) -> None:
        lost.append(e)
        lost_event.set()

    lease.start_heartbeat(on_lost=on_lost, on_renewed=renewed.append)
    try:
        time.sleep(2.5 * ttl)   # past the ttl: only renewals keep it held
        assert lease.valid() and len(renewed) >= 2 and renewed == sorted(renewed)
        with pytest.raises(LeaseHeld):
            Lease.acquire(run_dir, run_id="taker")   # real clock: the heartbeat is fresh
        taker = Lease.acquire(run_dir, run_id="taker", clock=_later(2 * ttl))
        taken = _raw(run_dir, taker.epoch)
        assert lost_event.wait(timeout=5)
        time.sleep(ttl)   # several beats' time, and no further calls: the heartbeat stopped
        assert len(lost) == 1 and isinstance(lost[0], LeaseLost) and not lease.valid()
        assert _raw(run_dir, taker.epoch) == taken
    finally:
        lease.release()
    assert _raw(run_dir, taker.epoch) == taken


def test_heartbeat_retries_through_transient_errors(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lease = Lease.acquire(str(tmp_path / "run"), run_id="r", ttl=0.4)
    store = lease._store
    failures = [OSError("disk hiccup"), OSError("disk hiccup")]
    overwrite = store.overwrite

    def flaky(epoch: int, data: bytes) -> None:
        if failures:
            raise failures.pop()
        overwrite(epoch, data)

    monkeypatch.setattr(store, "overwrite", flaky)
    renewed = threading.Event()
    lost: list[BaseException] = []
    lease.start_heartbeat(on_lost=lost.append, on_renewed=lambda _until: renewed.set())
    try:
        assert renewed.wait(timeout=5)
        assert not failures and not lost
    finally:
        lease.release()
    holder = read_holder(str(tmp_path / "run"))
    assert holder is not None and holder.released


# --- errors ---------------------------------------------------------------------------------

def test_a_corrupt_lease_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "lease").mkdir()
    (tmp_path / "lease" / "000000000003.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"lease/000000000003\.json is not a valid lease record"):
        Lease.acquire(str(tmp_path), run_id="r")


def test_s3_without_boto3_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)   # import boto3 -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'bulkmail\[s3\]'"):
        read_holder("s3://some-bucket/runs/c")


def test_unsupported_run_dir_and_ttl() -> None:
    with pytest.raises(UsageError, match="local run directory or an s3://"):
        read_holder("gs://bucket/runs/c")
    with pytest.raises(UsageError, match="ttl"):
        Lease.acquire("/nonexistent/never-created", run_id="r", ttl=0)
    assert issubclass(LeaseLost, BulkmailError) and not issubclass(LeaseLost, UsageError)
    assert lease_mod.DEFAULT_TTL == 10.0
