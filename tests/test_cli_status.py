"""`bulkmail status` and `bulkmail export` as a user runs them: the installed console script,
against campaigns a real run left (finished, stopped half-way, still running, on S3)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest

from .conftest import cli, write_recipients
from .test_faults import launch, wait_for_sends

pytestmark = pytest.mark.slow
BULKMAIL = shutil.which("bulkmail") or "bulkmail"


def bulkmail(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BULKMAIL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def status_json(cwd: Path, campaign: str = "c", *extra: str) -> dict[str, object]:
    done = bulkmail("status", campaign, "--json", *extra, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_finished_campaign_status_and_export(tmp_path: Path) -> None:
    write_recipients(tmp_path / "in.parquet", 500, invalid_fraction=0.04)
    run = cli("--input", "in.parquet", "--campaign", "c", "--actors", "1", "--threads-per-actor",
              "10", "--latency", "0", "--no-dashboard", "--no-charts", "--permanent-fail-rate",
              "0.1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    led = pl.read_parquet(tmp_path / "runs/c/ledger.parquet")
    st = status_json(tmp_path)
    counts = st["counts"]
    assert isinstance(counts, dict)
    for status in ("sent", "failed", "invalid"):
        assert counts[status] == led.filter(pl.col("status") == status).height, status
    assert st["done"] == st["total"] == 500 and st["state"] == "finished"
    text = bulkmail("status", "c", cwd=tmp_path)
    assert text.returncode == 0 and "550" in text.stdout  # the top failure reason
    assert all(len(ln) <= 100 for ln in text.stdout.splitlines())

    out = bulkmail("export", "c", "--status", "failed", "--format", "csv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    exported = pl.read_csv(io.StringIO(out.stdout))
    expected = led.filter(pl.col("status") == "failed").sort("id")
    assert exported["id"].to_list() == expected["id"].to_list()
    pq = tmp_path / "all.parquet"
    out = bulkmail("export", "c", "--format", "parquet", "--output", str(pq), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert pl.read_parquet(pq).height == 500


def test_status_while_running_only_grows_and_ends_equal_to_the_ledger(tmp_path: Path) -> None:
    rows = 2500
    proc, log, _ = launch(tmp_path, rows, latency=0.05)
    wait_for_sends(log, 200, proc)
    seen = []
    while proc.poll() is None:
        st = status_json(tmp_path)
        seen.append(int(st["counts"]["sent"]))  # type: ignore[index]
        if st["state"] == "running":
            assert st["holder"] and st["holder_active"], st
        time.sleep(0.5)
    assert proc.wait() == 0
    assert seen == sorted(seen) and len(seen) >= 2, seen
    final = status_json(tmp_path)
    assert final["counts"]["sent"] == rows == pl.read_parquet(  # type: ignore[index]
        tmp_path / "runs/c/ledger.parquet").height


def test_campaign_stopped_half_way(tmp_path: Path) -> None:
    rows = 3000
    proc, log, _ = launch(tmp_path, rows)
    wait_for_sends(log, 400, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=90)
    st = status_json(tmp_path)
    assert st["state"] == "stopped" and 0 < int(st["done"]) < rows  # type: ignore[call-overload]
    assert st["eta_s"] is None


@pytest.mark.usefixtures("s3")
def test_status_and_export_on_s3(tmp_path: Path) -> None:
    write_recipients(tmp_path / "in.parquet", 300)
    run = cli("--input", "in.parquet", "--campaign", "c", "--runs-dir", "s3://bulkmail-test/runs",
              "--actors", "1", "--threads-per-actor", "10", "--latency", "0", "--no-dashboard",
              "--no-charts", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    st = status_json(tmp_path, "s3://bulkmail-test/runs/c")
    assert st["counts"]["sent"] == 300  # type: ignore[index]
    out = bulkmail("export", "c", "--runs-dir", "s3://bulkmail-test/runs", cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 301


@pytest.mark.parametrize("args", [
    ["status", "no-such-campaign"],
    ["export", "no-such-campaign"],
    ["status"],
    ["export", "c", "--format", "xml"],
    ["export", "c", "--status", "bounced"],
])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "runs/c/ledger").mkdir(parents=True)
    write_recipients(tmp_path / "in.parquet", 5)
    env_ok = os.environ.get("PATH")
    assert env_ok
    done = bulkmail(*args, cwd=tmp_path)
    assert done.returncode == 2, done
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("bulkmail: error:", "usage:")), done.stderr
    assert "Traceback" not in done.stderr
