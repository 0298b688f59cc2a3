"""Crash safety with real processes: kill the driver, kill a sender actor, interrupt, poison a batch.

Sends are counted independently of the ledger: the fake sender appends each delivered id to a
send log with O_APPEND (one write(2) per line), so a repeat shows up even if the ledger hid it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from pipeline import generate, ledger
from pipeline.campaign import run_campaign
from pipeline.config import RetryPolicy
from pipeline.sending.fake import fake_outcome

from .conftest import campaign, cli, cli_env, read_ledger, write_recipients

FLUSH_SECONDS = 0.5  # SendConfig.flush_seconds default


def repeat_bound(processes: int, concurrency: int, latency: float) -> int:
    """README's bound, per lost process: the results of one flush interval (what completes in
    `flush_seconds` at full concurrency) plus its sends in flight, plus the sends in flight again
    for a flush still being written when the process died."""
    return processes * (int(concurrency * FLUSH_SECONDS / latency) + 2 * concurrency)


def send_log(path: Path) -> pl.Series:
    if not path.exists():
        return pl.Series("id", [], dtype=pl.Int64)
    return pl.Series("id", [int(x) for x in path.read_text().split()], dtype=pl.Int64)


def start_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              own_ray: bool | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=tmp_path,
                            env=cli_env(env, own_ray), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_sends(log: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(send_log(log)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} sends after {timeout}s")


def sender_processes() -> list[psutil.Process]:
    """Ray Data's sender actor processes (their title names the UDF). A CLI run joins the
    session's Ray, so they are that Ray's workers, not the run's children; one run at a time
    sends in these tests, and the in-process tests' actors end with their dataset."""
    out = []
    for p in psutil.process_iter():
        try:
            if "SendBatches" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def common_args(log: Path, *extra: str) -> list[str]:
    return ["--input", "in.parquet", "--campaign", "c", "--no-dashboard", "--no-charts",
            "--send-log", str(log), "--progress-every", "1", *extra]


WAVES = ["--wave-rows", "500"]  # with row groups of 250 rows: waves of 500, 1,000 and 1,500


def launch(tmp_path: Path, rows: int, *extra: str, actors: int = 2, threads: int = 10,
           latency: float = 0.05) -> tuple[subprocess.Popen[str], Path, list[str]]:
    """Start a CLI run over `rows` generated recipients (in row groups of 250); returns
    (process, send log, args)."""
    generate.generate(rows).write_parquet(tmp_path / "in.parquet", row_group_size=250)
    log = tmp_path / "sends.log"
    args = common_args(log, "--actors", str(actors), "--threads-per-actor", str(threads),
                       "--latency", str(latency), *extra)
    return start_cli(tmp_path, *args), log, args


def assert_exactly_once(tmp_path: Path, rows: int) -> pl.DataFrame:
    led = pl.read_parquet(tmp_path / "runs/c/ledger.parquet")
    assert led.height == rows
    assert sorted(led["id"].to_list()) == list(range(rows))
    assert led["status"].is_in(["sent", "failed"]).all()
    return led


@pytest.mark.slow
@pytest.mark.parametrize("waves", [[], WAVES], ids=["one-wave", "waves"])
def test_driver_sigkill_then_resume(tmp_path: Path, waves: list[str]) -> None:
    rows, actors, threads, latency = 3000, 2, 10, 0.05
    proc, log, args = launch(tmp_path, rows, "--batch-size", "200", *waves)
    wait_for_sends(log, rows // 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)  # what was in flight when the driver died is dead too: the log stops growing
    before = len(send_log(log))
    time.sleep(1)
    assert len(send_log(log)) == before, "senders outlived the killed driver"
    assert before < rows

    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "already done (resume)" in done.stdout
    led = assert_exactly_once(tmp_path, rows)
    assert (led["status"] == "sent").all()
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows)), "a recipient was skipped"
    repeats = len(sends) - rows
    print(f"driver SIGKILL: repeats {repeats}, bound {repeat_bound(actors, threads, latency)}")
    assert 0 <= repeats <= repeat_bound(actors, threads, latency), repeats
    # The resume picked up exactly where the journal ended: two runs, each id in one of them.
    assert led["run"].n_unique() == 2


@pytest.mark.slow
def test_sender_actor_sigkill_run_completes(tmp_path: Path) -> None:
    rows, threads, latency = 3000, 10, 0.05
    # 750-row batches, two in flight per actor, killed at 600 sends (about 150 into each batch):
    # the kill always lands mid-batch. Without the journal check on retry, the retried batches
    # resend the ~300 rows that actor had already sent, far above the bound asserted (120).
    proc, log, _ = launch(tmp_path, rows, "--batch-size", "750")
    wait_for_sends(log, 600, proc)
    victims = sender_processes()
    assert victims, "no sender actor process found"
    victims[0].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    led = assert_exactly_once(tmp_path, rows)
    assert (led["status"] == "sent").all()
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows))
    repeats = len(sends) - rows
    print(f"actor SIGKILL: repeats {repeats}, bound {repeat_bound(1, threads, latency)}")
    assert 0 <= repeats <= repeat_bound(1, threads, latency), repeats


@pytest.mark.slow
@pytest.mark.parametrize("waves", [[], WAVES], ids=["one-wave", "waves"])
def test_sigint_stops_cleanly_and_resume_completes(tmp_path: Path, waves: list[str]) -> None:
    """In waves, the stop comes in the second wave (rows 500-1,499), its third still loading
    or waiting for its turn: the report still adds up, and the resume loads the rest."""
    rows = 3000
    proc, log, args = launch(tmp_path, rows, *waves)
    wait_for_sends(log, 900 if waves else 400, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "Resume with: python -m pipeline.run" in err
    assert "Traceback" not in err
    partial = pl.read_parquet(tmp_path / "runs/c/ledger.parquet")  # readable, consolidated
    assert 0 < partial.height < rows
    assert (partial["status"] == "sent").all()
    assert "not sent (stopped)" in out
    assert json.loads((tmp_path / "runs/c/report.json").read_text())["counts"]["reconciled"]

    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path, rows)
    sends = send_log(log)
    # A graceful stop lets in-flight sends finish and flushes them: nothing is sent twice.
    assert len(sends) == rows and sends.n_unique() == rows


@pytest.mark.slow
def test_second_signal_exits_at_once_and_ledger_stays_readable(tmp_path: Path) -> None:
    rows, actors, threads, latency = 3000, 2, 10, 0.05
    proc, log, args = launch(tmp_path, rows)
    wait_for_sends(log, 400, proc)
    proc.send_signal(signal.SIGTERM)  # the first: a graceful stop begins
    time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)  # the second: out now
    out, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5
    assert proc.returncode == 130, err
    assert "second signal" in err and "Traceback" not in err
    # No consolidated ledger was written, but every flushed part is whole and readable.
    journal = ledger.read_ledger(str(tmp_path / "runs/c"))
    assert journal.height > 0 and journal["id"].is_unique().all()
    time.sleep(2)  # senders of the abandoned run are gone
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path, rows)
    sends = send_log(log)
    assert set(sends.to_list()) == set(range(rows))
    print(f"second signal: repeats {len(sends) - rows}, bound {repeat_bound(actors, threads, latency)}")
    assert len(sends) - rows <= repeat_bound(actors, threads, latency)


@pytest.mark.slow
def test_poisoned_batch_ends_failed_not_looping(tmp_path: Path) -> None:
    rows = 600
    write_recipients(tmp_path / "in.parquet", rows)
    log = tmp_path / "sends.log"
    args = common_args(log, "--actors", "2", "--threads-per-actor", "5", "--latency", "0.01",
                       "--batch-size", "50")
    done = cli(*args, cwd=tmp_path, env={"BULKMAIL_FAKE_CRASH_IDS": "250"})
    assert done.returncode == 0, done.stderr
    led = assert_exactly_once(tmp_path, rows)
    poisoned = led.filter(pl.col("id") == 250).row(0, named=True)
    assert poisoned["status"] == "failed"
    assert "worker process died" in poisoned["error"]
    failed = led.filter(pl.col("status") == "failed")
    # Only rows of the poisoned batch (ids 250..299 by --batch-size 50) can be given up on.
    assert failed["id"].min() >= 250 and failed["id"].max() < 300
    assert failed["error"].str.contains("worker process died").all()
    assert set(send_log(log).to_list()) | set(failed["id"].to_list()) == set(range(rows))


@pytest.mark.usefixtures("ray_session")
def test_transient_failures_retried_until_sent(tmp_path: Path) -> None:
    rows, seed = 2000, 11
    path = write_recipients(tmp_path / "in.parquet", rows)
    rep = run_campaign(campaign(tmp_path, path, fail_rate=0.3, seed=seed, threads_per_actor=20,
                                retry=RetryPolicy(max_attempts=5, backoff_base=0.01)))
    led = read_ledger(tmp_path)
    assert (led["status"] == "sent").all()
    # The fake's verdicts are reproducible: each flaky recipient needed exactly its streak + 1.
    expected = []
    for i in range(rows):
        attempt = 1
        while not fake_outcome(seed, i, attempt, fail_rate=0.3, permanent_fail_rate=0).ok:
            attempt += 1
        expected.append(attempt)
    assert led.sort("id")["attempts"].to_list() == expected
    assert 500 < sum(a > 1 for a in expected) < 700
    assert rep.send.retries == sum(expected) - rows


@pytest.mark.usefixtures("ray_session")
def test_permanent_failures_not_retried(tmp_path: Path) -> None:
    rows = 1000
    path = write_recipients(tmp_path / "in.parquet", rows)
    run_campaign(campaign(tmp_path, path, permanent_fail_rate=0.1, seed=3,
                          retry=RetryPolicy(max_attempts=5, backoff_base=0.01)))
    led = read_ledger(tmp_path)
    failed = led.filter(pl.col("status") == "failed")
    assert 50 < failed.height < 150
    assert (failed["attempts"] == 1).all()
    assert failed["error"].str.starts_with("550").all()


@pytest.mark.usefixtures("ray_session")
def test_resume_skips_done_and_restart_sends_again(tmp_path: Path) -> None:
    rows = 1000
    path = write_recipients(tmp_path / "in.parquet", rows)
    log = tmp_path / "sends.log"
    first = run_campaign(campaign(tmp_path, path, send_log=str(log), permanent_fail_rate=0.05))
    assert first.counts.sent + first.counts.failed == rows
    again = run_campaign(campaign(tmp_path, path, send_log=str(log), permanent_fail_rate=0.05))
    assert again.counts.already_done == rows and again.counts.sent == 0
    assert len(send_log(log)) == first.counts.sent  # nothing sent twice
    retry = run_campaign(campaign(tmp_path, path, send_log=str(log), retry_failed=True))
    assert retry.counts.already_done == first.counts.sent
    assert retry.counts.sent == first.counts.failed
    assert (read_ledger(tmp_path)["status"] == "sent").all()
    restart = run_campaign(campaign(tmp_path, path, send_log=str(log), restart=True))
    assert restart.counts.already_done == 0 and restart.counts.sent == rows
    assert len(send_log(log)) == 2 * rows
