"""One campaign, one sender, with real processes: two launches at once, a holder killed or paused
mid-run, and a Ctrl-C that stops in seconds. The campaign's own use of lease.py (the lease's
rules are tested on their own in test_lease.py)."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.lab.sink import Sink
from pipeline.lease import Lease, read_holder

from .conftest import cli, write_recipients
from .test_faults import (
    assert_exactly_once,
    common_args,
    launch,
    repeat_bound,
    send_log,
    start_cli,
    wait_for_sends,
)

pytestmark = pytest.mark.slow


def _lease_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "lease").glob("*.json"))


def test_two_launches_at_once_send_each_recipient_once(tmp_path: Path) -> None:
    rows = 600
    write_recipients(tmp_path / "in.parquet", rows)
    with Sink() as sink:
        args = ["--input", "in.parquet", "--campaign", "twin", "--no-dashboard", "--no-charts",
                "--sender", "smtp", "--smtp-port", str(sink.port), "--actors", "2",
                "--threads-per-actor", "5", "--progress-every", "1"]
        procs = [start_cli(tmp_path, *args) for _ in range(2)]
        results = [p.communicate(timeout=240) for p in procs]
        codes = sorted(p.returncode for p in procs)
        received = collections.Counter(r.rcpt_tos[0] for r in sink.received)
    assert codes == [0, 2], results
    loser = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    lines = [ln for ln in loser.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in loser, loser
    assert "twin" in lines[0] and f"pid {winner.pid}" in lines[0], lines[0]
    assert len(received) == rows and set(received.values()) == {1}, "someone got it twice"
    led = pl.read_parquet(tmp_path / "runs/twin/ledger.parquet")
    assert led.height == rows and (led["status"] == "sent").all()
    assert led["epoch"].n_unique() == 1 and led["epoch"][0] >= 1


@pytest.mark.usefixtures("s3")
def test_two_launches_at_once_on_s3(tmp_path: Path) -> None:
    rows = 600
    write_recipients(tmp_path / "in.parquet", rows)
    log = tmp_path / "sends.log"
    args = common_args(log, "--runs-dir", "s3://bulkmail-test/runs", "--actors", "2",
                       "--threads-per-actor", "5", "--latency", "0.01")
    procs = [start_cli(tmp_path, *args) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], results
    loser = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 2)
    assert "already running" in loser or "held by" in loser, loser
    sends = send_log(log)
    assert len(sends) == rows and sends.n_unique() == rows
    holder = read_holder("s3://bulkmail-test/runs/c")
    assert holder is not None and holder.released


def test_killed_holder_is_taken_over_and_the_campaign_completes_once(tmp_path: Path) -> None:
    rows, threads, latency, ttl = 3000, 10, 0.05, 4.0
    proc, log, args = launch(tmp_path, rows, "--lease-ttl", str(ttl))
    wait_for_sends(log, rows // 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = tmp_path / "runs/c"
    # Make the dead holder look like one on another host: its pid can no longer prove it gone,
    # so only the expiry frees the campaign.
    top = _lease_files(run_dir)[-1]
    record = json.loads(top.read_text())
    record["host"] = "elsewhere.example"
    top.write_text(json.dumps(record))
    t0 = time.time()
    early = cli(*args, cwd=tmp_path, timeout=120)
    assert early.returncode == 2, early.stderr
    assert "elsewhere.example" in early.stderr and "expire" in early.stderr, early.stderr
    time.sleep(max(0.0, record["heartbeat_at"] + ttl - time.time()) + 0.5)
    done = cli(*args, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr
    assert time.time() - t0 < 240
    led = assert_exactly_once(tmp_path, rows)
    assert led["epoch"].max() > led["epoch"].min()  # two holders wrote it
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows))
    assert len(sends) - rows <= repeat_bound(2, threads, latency)


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    rows = 2000
    proc, log, args = launch(tmp_path, rows, "--lease-ttl", "60")
    wait_for_sends(log, 300, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.time()
    done = cli(*args, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr
    assert time.time() - t0 < 60  # did not wait out the 60 s expiry: the pid is provably gone
    assert_exactly_once(tmp_path, rows)


def test_paused_holder_whose_lease_was_taken_stops_and_exits_nonzero(tmp_path: Path) -> None:
    rows, ttl = 3000, 4.0
    proc, log, args = launch(tmp_path, rows, "--lease-ttl", str(ttl))
    wait_for_sends(log, 500, proc)
    run_dir = str(tmp_path / "runs/c")
    os.kill(proc.pid, signal.SIGSTOP)  # a long pause: GC, swap, a stopped VM
    try:
        time.sleep(ttl + 1.5)
        # Its senders stopped on their own once the lease's deadline passed.
        sent_before = len(send_log(log))
        taker = Lease.acquire(run_dir, run_id="taker", ttl=ttl)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "took the campaign over" in err and "Traceback" not in err
    assert len(send_log(log)) == sent_before, "the paused run sent after losing its lease"
    taker.release()
    done = cli(*args, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path, rows)
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows))
    assert len(sends) - rows <= repeat_bound(2, 10, 0.05)


def test_paused_past_its_lease_with_no_taker_does_not_call_the_campaign_finished(
        tmp_path: Path) -> None:
    # The senders stop once the deadline passes and never start again (a taker may have come
    # and gone): the rows they left are for a resume, and the run must say it stopped.
    rows, ttl = 3000, 2.0
    proc, log, _ = launch(tmp_path, rows, "--lease-ttl", str(ttl))
    wait_for_sends(log, 500, proc)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(ttl + 1.5)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Resume with" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "runs/c/campaign.json").read_text())
    assert manifest["state"] == "stopped"
    # What it sent is what its ledger holds, once each: a resume (tested after a Ctrl-C in
    # test_faults.py) sends exactly the rest.
    partial = pl.read_parquet(tmp_path / "runs/c/ledger.parquet")
    assert 0 < partial.height < rows and partial["id"].is_unique().all()
    assert (partial["status"] == "sent").all()
    sends = send_log(log)
    assert len(sends) == partial.height and set(sends.to_list()) == set(partial["id"].to_list())


def test_a_lease_shorter_than_the_start_of_the_send_stage_still_sends_everything(
        tmp_path: Path) -> None:
    # Trusted for 0.75 s: cutting the blocks and starting the actors take longer, so the
    # coordinator must get the renewals before the first result comes back too.
    rows = 600
    write_recipients(tmp_path / "in.parquet", rows)
    log = tmp_path / "sends.log"
    done = cli(*common_args(log, "--actors", "2", "--threads-per-actor", "5", "--latency", "0.01",
                            "--lease-ttl", "1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+not sent \(stopped\)\s+0$", done.stdout, re.M), done.stdout
    assert_exactly_once(tmp_path, rows)
    assert len(send_log(log)) == rows


def test_sigint_at_full_concurrency_exits_in_seconds_and_resumes_once(tmp_path: Path) -> None:
    # The card's shape (8 actors × 100 threads) at a fifth of the default latency; at 0.5 s the
    # same logic exits within 5 s (README).
    rows, actors, threads, latency = 16_000, 8, 100, 0.1
    proc, log, args = launch(tmp_path, rows, actors=actors, threads=threads, latency=latency)
    wait_for_sends(log, 3000, proc, timeout=180)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    took = time.time() - t0
    assert proc.returncode == 130, err
    print(f"SIGINT to exit: {took:.2f} s")
    assert took < 8.0, took
    partial = pl.read_parquet(tmp_path / "runs/c/ledger.parquet")
    assert 0 < partial.height < rows
    done = cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path, rows)
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows))
    assert len(sends) - rows <= repeat_bound(actors, threads, latency)


def test_dry_run_takes_no_lease(tmp_path: Path) -> None:
    write_recipients(tmp_path / "in.parquet", 50)
    run_dir = tmp_path / "runs/c"
    held = Lease.acquire(str(run_dir), run_id="someone", ttl=30)
    try:
        done = cli("--input", "in.parquet", "--campaign", "c", "--dry-run", "3", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert len(list((run_dir / "dry-run").glob("*.eml"))) == 3
        assert len(_lease_files(run_dir)) == 1
    finally:
        held.release()


def test_a_launch_that_finds_its_campaign_running_exits_before_importing_ray(
        tmp_path: Path) -> None:
    # Ray's imports start on a thread only once the lease is the run's: a process leaving
    # while that thread was inside an extension module's import aborted once in the suite
    # ("FATAL: exception not rethrown", exit -6). Run in a process of its own, without Ray.
    import subprocess
    import sys
    write_recipients(tmp_path / "in.parquet", 20)
    code = """
import sys, threading
from pipeline.campaign import run_campaign
from pipeline.config import CampaignConfig, SendConfig
from pipeline.errors import UsageError
from pipeline.lease import Lease
runs = sys.argv[2]
Lease.acquire(runs + "/held", run_id="the-other-run", ttl=600)
try:
    run_campaign(CampaignConfig(input=sys.argv[1], runs_dir=runs, campaign="held",
                                dashboard=False, send=SendConfig(actors=1, latency=0.01)))
except UsageError as exc:
    print("usage:", exc)
alive = [t.name for t in threading.enumerate() if t.name == "prefetch-imports"]
print("ray imported:", "ray" in sys.modules, "threads:", alive)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.parquet"),
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "the-other-run" in out.stdout, out.stdout
    assert "ray imported: False threads: []" in out.stdout, out.stdout
