"""`bulkmail export`: who received what, the latest outcome per recipient, as CSV or Parquet."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import BinaryIO, Literal

import polars as pl

from . import ledger, ledger_scan, storage
from .errors import UsageError

EXPORT_COLUMNS = ("id", "email", "status", "attempts", "error", "finished_at", "message_id")
EXPORT_FORMATS = ("csv", "parquet")


def _check_statuses(statuses: Sequence[str] | None) -> list[str] | None:
    if statuses is None:
        return None
    if isinstance(statuses, str):
        statuses = [statuses]
    wanted = [s.strip().lower() for item in statuses for s in item.split(",") if s.strip()]
    valid = ", ".join(ledger.FINAL_STATUSES)
    if not wanted:
        raise UsageError(f"--status: give at least one of {valid}")
    for s in wanted:
        if s not in ledger.FINAL_STATUSES:
            raise UsageError(f"--status {s!r}: not a status (choose from {valid})")
    return list(dict.fromkeys(wanted))


def _export_frame(run_dir: str, statuses: list[str] | None) -> pl.DataFrame:
    def query(journal: pl.LazyFrame) -> pl.DataFrame:
        latest = ledger_scan.latest(journal, EXPORT_COLUMNS)
        if statuses is not None:
            latest = latest.filter(pl.col("status").is_in(statuses))
        # The output is wanted whole and sorted; the in-memory engine sorts 2M rows in half the
        # time and memory of the streaming one here.
        return latest.collect(engine="in-memory")
    return ledger_scan.read(run_dir, query)


def _write(frame: pl.DataFrame, out: BinaryIO, format: str) -> None:
    if format == "csv":
        frame.write_csv(out)
    else:
        frame.write_parquet(out, compression="zstd")


def export(run_dir: str, dest: str | BinaryIO, *, statuses: Sequence[str] | None = None,
           format: Literal["csv", "parquet"] = "csv") -> int:
    """Write who received what: the latest row per id, sorted by id, with `EXPORT_COLUMNS`,
    only `statuses` if given. `dest` is a path (local or a URI; written whole or not at all) or
    a binary stream. Returns the number of rows written."""
    if format not in EXPORT_FORMATS:
        raise UsageError(f"--format {format!r}: choose csv or parquet")
    wanted = _check_statuses(statuses)
    ledger_scan.require_run_dir(run_dir)
    if isinstance(dest, str):
        if not dest:
            raise UsageError("export: no destination given")
        if storage.is_local(dest):
            directory = os.path.dirname(os.path.abspath(storage.resolve(dest)[1]))
            if not os.path.isdir(directory):
                raise UsageError(f"export: {directory}: no such directory")
    frame = _export_frame(run_dir, wanted)
    if not isinstance(dest, str):
        _write(frame, dest, format)
        return frame.height
    # Serialised first, then published by the one atomic write (storage.write_bytes): a reader,
    # or a failed export, never sees half a file.
    buf = io.BytesIO()
    _write(frame, buf, format)
    storage.write_bytes(dest, buf.getvalue())
    return frame.height
