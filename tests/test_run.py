"""The command line as a user runs it: a real process on the session's Ray, real files (the
printed dashboard access is tested with a Ray of the run's own in test_console.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from pipeline.flags import build_parser

from .conftest import cli, write_recipients


def test_cli_run_prints_progress_summary_and_writes_timeline(tmp_path: Path) -> None:
    write_recipients(tmp_path / "in.parquet", 1200)
    done = cli("--input", "in.parquet", "--actors", "2", "--threads-per-actor", "10",
               "--latency", "0.02", "--campaign", "cli", "--timeline", "trace.json",
               "--progress-every", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # stdout is a pipe, not a TTY: progress comes as timestamped log lines, no carriage returns.
    progress = [ln for ln in out.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] sent ", ln)]
    assert progress and "\r" not in out
    assert "1,200/1,200 (100.0%)" in progress[-1]
    assert re.search(r"emails/s\s+ETA", progress[0])
    for label in ("input rows", "sent", "failed", "stage send (s)", "efficiency vs ideal",
                  "latency p50/p95/p99 (s)", "reconciled"):
        assert re.search(rf"^\s+{re.escape(label)}\s", out, re.M), label
    assert re.search(r"^\s+sent\s+1,200$", out, re.M)
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert isinstance(trace, list) and any("SendBatches" in str(ev.get("name", "")) or
                                           "MapWorker" in str(ev.get("cat", "")) for ev in trace)
    run_dir = tmp_path / "runs/cli"
    assert pl.read_parquet(run_dir / "ledger.parquet").height == 1200
    assert (run_dir / "report.md").read_text().startswith("# bulkmail report: cli")


def test_default_campaign_name_from_input_and_date(tmp_path: Path) -> None:
    write_recipients(tmp_path / "My List.parquet", 5)
    done = cli("--input", "My List.parquet", "--actors", "1", "--threads-per-actor", "5",
               "--latency", "0", "--no-dashboard", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (name,) = [p.name for p in (tmp_path / "runs").iterdir()]
    assert re.fullmatch(r"My-List-\d{8}", name)


def test_help_documents_every_flag_with_its_default() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert flag in text, flag
        assert action.help, f"{flag} has no help text"
    assert "(default: 0.5)" in text  # --latency
    assert "(default: 8)" in text and "(default: 100)" in text  # --actors, --threads-per-actor
