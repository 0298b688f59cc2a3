"""The ledger as plain functions over Parquet files: journal, consolidation, crash windows."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from pipeline import ledger


def writer(tmp_path: Path, name: str = "a", run: str = "r1") -> ledger.LedgerWriter:
    return ledger.LedgerWriter(str(tmp_path), writer=name, node="node-1", run=run, flush_seconds=0)


def test_the_polars_schema_is_the_arrow_schema_converted() -> None:
    # Spelled out in ledger.py (converting imports pandas): the two must stay one schema.
    assert pl.from_arrow(ledger.SCHEMA.empty_table()).schema == ledger.POLARS_SCHEMA  # type: ignore[union-attr]


def test_the_load_and_fold_tasks_modules_do_not_import_pandas() -> None:
    # A Ray worker imports these before its first load or fold task: pandas would add 0.3 s
    # to each on 2 cores, on the way to the first email.
    code = ("import sys, pipeline.load_stage, pipeline.ledger_stage; "
            "sys.exit('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_parts_hold_every_column_and_consolidate_to_one_row_per_id(tmp_path: Path) -> None:
    w = writer(tmp_path)
    now = time.time()
    for i in range(5):
        w.record(i, f"u{i}@x.org", "sent", 1, None, now, now + 0.5, 0.5, f"<c.{i}@x.org>")
    assert w.flush() == 5
    w.record(9, "u9@x.org", "failed", 3, "421 busy", now, now + 2, 0.5, "<c.9@x.org>")
    assert w.flush() == 1 and w.flush() == 0  # nothing buffered: no empty part
    parts = sorted((tmp_path / "ledger" / "00000").glob("part-*.parquet"))
    assert len(parts) == 2
    journal = ledger.read_journal(str(tmp_path))
    assert journal.schema == ledger.POLARS_SCHEMA
    row = journal.filter(pl.col("id") == 9).row(0, named=True)
    assert (row["status"], row["attempts"], row["error"], row["actor"], row["node"], row["run"]) == (
        "failed", 3, "421 busy", "a", "node-1", "r1")
    assert abs(row["finished_at"].timestamp() - (now + 2)) < 1e-3

    led = ledger.fold_partition(str(tmp_path), 0)[0]
    assert led.height == 6 and led["id"].is_unique().all()
    assert not list((tmp_path / "ledger" / "00000").glob("part-*.parquet"))  # absorbed
    assert pl.read_parquet(tmp_path / "ledger.parquet").height == 6
    assert (tmp_path / "ledger.parquet" / "part-00000.parquet").is_file()


def test_rows_land_in_their_partition_and_each_partition_reads_alone(tmp_path: Path) -> None:
    w = writer(tmp_path)
    ids = list(range(12))
    w.assign(ids, [i % 3 for i in ids])
    for i in ids:
        w.record(i, f"u{i}@x.org", "sent" if i % 2 else "failed", 1, None, 1.0, 2.0, 1.0, None)
    assert w.flush() == 12
    w.release(ids)
    for p in range(3):
        (part,) = (tmp_path / "ledger" / f"{p:05d}").glob("part-*.parquet")
        assert sorted(pl.read_parquet(part)["id"].to_list()) == [i for i in ids if i % 3 == p]
        assert pl.read_parquet(part)["part"].to_list() == [p] * 4
    assert ledger.partitions_present(str(tmp_path)) == [0, 1, 2]
    assert sorted(ledger.done_ids(str(tmp_path), 1).to_list()) == [1, 4, 7, 10]
    assert sorted(ledger.done_ids(str(tmp_path), 1, retry_failed=True).to_list()) == [1, 7]
    assert ledger.recorded_ids(str(tmp_path), [1, 2, 4], parts=[1]) == {1, 4}
    assert ledger.recorded_ids(str(tmp_path), [1, 2, 4]) == {1, 2, 4}
    ledger.fold_partition(str(tmp_path), 2)
    assert ledger.read_ledger(str(tmp_path)).height == 12  # folded and unfolded together
    assert sorted(ledger.done_ids(str(tmp_path), 2).to_list()) == [2, 5, 8, 11]


def test_latest_outcome_wins_and_done_ids_follow_retry_failed(tmp_path: Path) -> None:
    now = time.time()
    w1 = writer(tmp_path, "a", "r1")
    w1.record(1, "a@x.org", "failed", 3, "421", now, now + 1, 0.1, None)
    w1.record(2, "b@x.org", "sent", 1, None, now, now + 1, 0.1, None)
    w1.flush()
    assert sorted(ledger.done_ids(str(tmp_path), 0).to_list()) == [1, 2]
    assert ledger.done_ids(str(tmp_path), 0, retry_failed=True).to_list() == [2]
    w2 = writer(tmp_path, "b", "r2")
    w2.record(1, "a@x.org", "sent", 1, None, now + 5, now + 6, 0.1, None)
    w2.flush()
    led = ledger.read_ledger(str(tmp_path))
    assert led.filter(pl.col("id") == 1)["status"].to_list() == ["sent"]


def test_crash_between_consolidate_and_part_deletion_double_counts_nothing(tmp_path: Path) -> None:
    w = writer(tmp_path)
    now = time.time()
    for i in range(3):
        w.record(i, f"u{i}@x.org", "sent", 1, None, now, now + 1, 1.0, None)
    w.flush()
    (part,) = (tmp_path / "ledger" / "00000").glob("part-*.parquet")
    saved = tmp_path / "saved.parquet"
    shutil.copy(part, saved)
    ledger.fold_partition(str(tmp_path), 0)
    shutil.copy(saved, part)  # as if the process died before deleting the absorbed part
    assert ledger.read_ledger(str(tmp_path)).height == 3
    assert ledger.fold_partition(str(tmp_path), 0)[0].height == 3


def test_leftover_temp_file_from_a_killed_write_is_ignored(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.record(1, "a@x.org", "sent", 1, None, 1.0, 2.0, 1.0, None)
    w.flush()
    (tmp_path / "ledger" / "00000" / ".part-a-xyz-000009.parquet.1234.tmp").write_bytes(
        b"PAR1 half a file")
    assert ledger.read_ledger(str(tmp_path))["id"].to_list() == [1]


def test_rows_settled_at_load_are_written_with_the_ledger_schema(tmp_path: Path) -> None:
    frame = pl.DataFrame({"id": [7], "email": ["bad"], "status": ["invalid"], "attempts": [0],
                          "error": ["no @ in address"], "duplicate_of": [None], "run": ["r1"]})
    ledger.write_frame(str(tmp_path), frame, name="load-r1")
    led = ledger.read_ledger(str(tmp_path))
    assert led.schema == ledger.POLARS_SCHEMA
    assert led.row(0, named=True)["error"] == "no @ in address"
    ledger.write_frame(str(tmp_path), frame.clear(), name="load-empty")  # no empty file
    assert not list((tmp_path / "ledger").rglob("load-empty.parquet"))


def test_periodic_flush_writes_without_being_asked(tmp_path: Path) -> None:
    w = ledger.LedgerWriter(str(tmp_path), writer="p", node="n", run="r", flush_seconds=0.05)
    w.record(1, "a@x.org", "sent", 1, None, 1.0, 2.0, 1.0, None)
    deadline = time.time() + 5
    while time.time() < deadline and not list((tmp_path / "ledger").rglob("part-p-*.parquet")):
        time.sleep(0.02)
    w.close()
    assert ledger.read_journal(str(tmp_path))["id"].to_list() == [1]
