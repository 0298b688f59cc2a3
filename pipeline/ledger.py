"""The ledger: one row per recipient with its final outcome, written as Parquet while the run goes.

Layout under `runs/<campaign>/`, by address partition (`partitions.py`; `<p>` is 00000, 00001…):
- `ledger/<p>/part-*.parquet`: the journal. Each part is written atomically by the process that
  produced its rows (sender actors every `flush_seconds`, and at the end of every batch; the
  load's tasks for rows settled at load time). A crash loses at most the unflushed results.
- `ledger.parquet/part-<p>.parquet`: the consolidated ledger of partition `<p>`, one row per
  recipient, folded at the end of a run from the previous one and the partition's parts, by
  one task per partition (`fold_partition`); `ledger.parquet` reads as one Parquet dataset.

Reading always takes the union of both and keeps one row per id, so a crash between writing a
consolidated file and deleting the parts it absorbed loses and doubles nothing.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import storage

SENT = "sent"
FAILED = "failed"
INVALID = "invalid"
DUPLICATE = "duplicate"
SUPPRESSED = "suppressed"
# "Final" means resume skips the recipient. A failed recipient is final too (its attempts are
# used up); `--retry-failed` makes the next run try those again.
FINAL_STATUSES = (SENT, FAILED, INVALID, DUPLICATE, SUPPRESSED)
LOAD_STATUSES = (INVALID, DUPLICATE, SUPPRESSED)

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("email", pa.large_string()),
    ("status", pa.large_string()),
    ("attempts", pa.int32()),
    ("error", pa.large_string()),
    ("started_at", _TS),
    ("finished_at", _TS),
    ("latency_s", pa.float64()),
    ("actor", pa.large_string()),
    ("node", pa.large_string()),
    ("message_id", pa.large_string()),
    ("duplicate_of", pa.int64()),
    ("run", pa.large_string()),
    # The campaign lease's epoch of the run that wrote the row (lease.py): a late write from a
    # run that had lost its lease carries an older epoch than the rows of the run that took over.
    ("epoch", pa.int64()),
    # The address partition the row belongs to (its directory under ledger/).
    ("part", pa.int32()),
])
# Spelled out, not converted from SCHEMA: `SCHEMA.empty_table()` imports pandas, 0.3 s of
# every Ray worker's start on 2 cores (the load's and the fold's tasks import this module).
# tests/test_ledger.py checks that both schemas agree.
_UTC, _I64, _I32, _STR = pl.Datetime("us", "UTC"), pl.Int64(), pl.Int32(), pl.String()
POLARS_SCHEMA = pl.Schema({
    "id": _I64, "email": _STR, "status": _STR, "attempts": _I32, "error": _STR,
    "started_at": _UTC, "finished_at": _UTC, "latency_s": pl.Float64(), "actor": _STR,
    "node": _STR, "message_id": _STR, "duplicate_of": _I64, "run": _STR, "epoch": _I64,
    "part": _I32})


def ledger_dir(run_dir: str) -> str:
    return storage.join(run_dir, "ledger")


def ledger_file(run_dir: str) -> str:
    """The consolidated ledger: a directory of one Parquet file per partition."""
    return storage.join(run_dir, "ledger.parquet")


def _name(part: int) -> str:
    return f"{part:05d}"


def partition_dir(run_dir: str, part: int) -> str:
    return storage.join(ledger_dir(run_dir), _name(part))


def consolidated_file(run_dir: str, part: int) -> str:
    return storage.join(ledger_file(run_dir), f"part-{_name(part)}.parquet")


def partition_files(run_dir: str, part: int) -> list[str]:
    """One partition's journal parts, then its consolidated file if there is one. Parts are
    listed first: a fold writes the consolidated file before deleting the parts it absorbed,
    so this order never misses rows folded in between."""
    parts = storage.list_files(partition_dir(run_dir, part), ".parquet")
    consolidated = consolidated_file(run_dir, part)
    return [*parts, consolidated] if storage.exists(consolidated) else parts


def partitions_present(run_dir: str) -> list[int]:
    """Partitions with any journal part or consolidated file."""
    found = {int(name) for name in storage.list_dirs(ledger_dir(run_dir)) if name.isdigit()}
    for path in storage.list_files(ledger_file(run_dir), ".parquet"):
        stem = path.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix("part-")
        if stem.isdigit():
            found.add(int(stem))
    return sorted(found)


def journal_files(run_dir: str) -> list[str]:
    """Every file of the ledger, all partitions (parts before consolidated files)."""
    parts: list[str] = []
    consolidated: list[str] = []
    for p in partitions_present(run_dir):
        files = partition_files(run_dir, p)
        parts.extend(f for f in files if f != consolidated_file(run_dir, p))
        consolidated.extend(f for f in files if f == consolidated_file(run_dir, p))
    return parts + consolidated


def _seconds_to_ts(values: list[float | None]) -> pa.Array:
    # Vectorised (the same truncation as int(v * 1e6)): a Python loop here was 130 ns a value,
    # a quarter of a flush at 60,000 rows/s.
    micros = pc.multiply(pa.array(values, pa.float64()), 1_000_000)
    return micros.cast(pa.int64(), safe=False).cast(_TS)


class LedgerWriter:
    """Buffers per-recipient outcomes inside one process and writes them as Parquet parts, one
    per address partition the buffered rows belong to.

    Thread-safe: sender threads (or the event loop) call `record`; a daemon thread flushes every
    `flush_seconds`, and callers flush at the end of a batch so a finished batch is durable
    before Ray Data hears that it finished. `assign` says which partition each id of a batch
    belongs to before its rows are recorded (ids not assigned land in partition 0).
    """

    def __init__(self, run_dir: str, *, writer: str, node: str, run: str, epoch: int | None = None,
                 flush_seconds: float = 0.5) -> None:
        self._run_dir = run_dir
        storage.makedirs(ledger_dir(run_dir))
        self._writer = writer
        self._node = node
        self._run = run
        self._epoch = epoch
        # A restarted actor reuses its name: the uuid keeps its parts from overwriting.
        self._prefix = f"part-{writer}-{uuid.uuid4().hex[:8]}"
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._cols: dict[str, list[object]] = self._empty()
        self._parts: dict[int, int] = {}
        self._closed = threading.Event()
        self.rows_written = 0
        if flush_seconds > 0:
            t = threading.Thread(target=self._flush_loop, args=(flush_seconds,),
                                 name="ledger-flush", daemon=True)
            t.start()

    @staticmethod
    def _empty() -> dict[str, list[object]]:
        return {k: [] for k in ("id", "email", "status", "attempts", "error", "started_at",
                                "finished_at", "latency_s", "message_id")}

    def assign(self, ids: Iterable[int], parts: Iterable[int]) -> None:
        with self._lock:
            self._parts.update(zip(ids, parts, strict=True))

    def release(self, ids: Iterable[int]) -> None:
        """Forget the partitions of a finished batch's ids (after its flush)."""
        with self._lock:
            for i in ids:
                self._parts.pop(i, None)

    def record(self, id: int, email: str, status: str, attempts: int, error: str | None,
               started_at: float | None, finished_at: float | None, latency_s: float | None,
               message_id: str | None) -> None:
        with self._lock:
            c = self._cols
            c["id"].append(id)
            c["email"].append(email)
            c["status"].append(status)
            c["attempts"].append(attempts)
            c["error"].append(error)
            c["started_at"].append(started_at)
            c["finished_at"].append(finished_at)
            c["latency_s"].append(latency_s)
            c["message_id"].append(message_id)

    def pending(self) -> int:
        with self._lock:
            return len(self._cols["id"])

    def flush(self) -> int:
        """Write what is buffered, one part per partition; returns the number of rows written."""
        with self._io_lock:  # one writer at a time keeps part numbers in order
            with self._lock:
                cols, self._cols = self._cols, self._empty()
                parts = [self._parts.get(i, 0) for i in cols["id"]]  # type: ignore[call-overload]
            n = len(cols["id"])
            if n == 0:
                return 0
            table = pa.table({
                "id": pa.array(cols["id"], pa.int64()),
                "email": pa.array(cols["email"], pa.large_string()),
                "status": pa.array(cols["status"], pa.large_string()),
                "attempts": pa.array(cols["attempts"], pa.int32()),
                "error": pa.array(cols["error"], pa.large_string()),
                "started_at": _seconds_to_ts(cols["started_at"]),  # type: ignore[arg-type]
                "finished_at": _seconds_to_ts(cols["finished_at"]),  # type: ignore[arg-type]
                "latency_s": pa.array(cols["latency_s"], pa.float64()),
                "actor": pa.repeat(pa.scalar(self._writer, pa.large_string()), n),
                "node": pa.repeat(pa.scalar(self._node, pa.large_string()), n),
                "message_id": pa.array(cols["message_id"], pa.large_string()),
                "duplicate_of": pa.nulls(n, pa.int64()),
                "run": pa.repeat(pa.scalar(self._run, pa.large_string()), n),
                "epoch": pa.repeat(pa.scalar(self._epoch, pa.int64()), n),
                "part": pa.array(parts, pa.int32()),
            }, schema=SCHEMA)
            name = f"{self._prefix}-{next(self._seq):06d}.parquet"
            _write_by_part(self._run_dir, table, name)
            self.rows_written += n
            return n

    def _flush_loop(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a failed periodic flush is retried next time
                pass

    def close(self) -> None:
        self._closed.set()
        self.flush()


def _write_by_part(run_dir: str, table: pa.Table, name: str) -> None:
    parts = table.column("part")
    values = pc.unique(parts).to_pylist()
    if len(values) == 1:
        directory = partition_dir(run_dir, int(values[0] or 0))
        storage.makedirs(directory)
        storage.write_table(table, storage.join(directory, name))
        return
    for value in values:
        directory = partition_dir(run_dir, int(value or 0))
        storage.makedirs(directory)
        storage.write_table(table.filter(pc.equal(parts, value)), storage.join(directory, name))


def write_frame(run_dir: str, frame: pl.DataFrame, *, name: str) -> None:
    """Write rows settled at load (invalid, duplicate, suppressed) as ledger parts, by the
    partition in their `part` (or `_part`) column."""
    if frame.height == 0:
        return
    if "_part" in frame.columns:
        frame = frame.rename({"_part": "part"})
    table = conform(frame).to_arrow().cast(SCHEMA)
    _write_by_part(run_dir, table, f"{name}.parquet")


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Give `frame` exactly the ledger's columns and types, filling absent ones with nulls."""
    return frame.select([
        (pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype)).alias(name)
        for name, dtype in POLARS_SCHEMA.items()
    ])


def _read_parts(paths: Iterable[str]) -> pl.DataFrame:
    # Read in parallel (Parquet decoding and object-store round trips release the GIL): a 1M
    # run leaves a few hundred parts, read one by one in 0.56 s, in parallel in about 0.2 s.
    paths = list(paths)
    if len(paths) > 1 and all(storage.is_local(p) for p in paths):
        # polars' multi-file scan decodes in Rust threads: 3,000 parts of 100 rows in 0.55 s,
        # against 7.8 s one by one and 3.5 s through pyarrow.dataset (measured here).
        local = [storage.resolve(p)[1] for p in paths]
        return pl.scan_parquet(local, schema=POLARS_SCHEMA, missing_columns="insert").collect()
    if len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            tables = list(pool.map(storage.read_table, paths))
    else:
        tables = [storage.read_table(p) for p in paths]
    if not tables:
        return pl.DataFrame(schema=POLARS_SCHEMA)
    table = pa.concat_tables([_conform_table(t) for t in tables])
    return pl.from_arrow(table)  # type: ignore[return-value]


def _conform_table(table: pa.Table) -> pa.Table:
    """`table` with the ledger's columns: a part written before a column existed gets nulls."""
    for name in SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def read_journal(run_dir: str) -> pl.DataFrame:
    """Every recorded row of every partition, repeats included (tests and small tools; the
    run itself reads one partition at a time)."""
    return _read_parts(journal_files(run_dir))


def read_partition(run_dir: str, part: int) -> pl.DataFrame:
    """One partition's journal: its parts and its consolidated file."""
    return _read_parts(partition_files(run_dir, part))


def latest(journal: pl.DataFrame) -> pl.DataFrame:
    """One row per id: the most recent outcome (a later run's `sent` beats an earlier `failed`)."""
    if journal.height == 0:
        return journal
    # Sorted by id, then time: keeping each id's last row in that order leaves the result
    # sorted by id (no second sort; this runs on every partition of every fold and resume).
    return (journal
            .sort(["id", pl.col("finished_at").fill_null(pl.datetime(1970, 1, 1, time_zone="UTC"))])
            .unique(subset="id", keep="last", maintain_order=True))


def read_ledger(run_dir: str) -> pl.DataFrame:
    """The ledger as it stands: one row per recipient recorded so far."""
    return latest(read_journal(run_dir))


def final_statuses(*, retry_failed: bool = False) -> list[str]:
    return [s for s in FINAL_STATUSES if not (retry_failed and s == FAILED)]


def done_ids(run_dir: str, part: int, *, retry_failed: bool = False) -> pl.Series:
    """Ids of one partition whose outcome is final, for the resume anti-join."""
    rows = latest(read_partition(run_dir, part))
    return rows.filter(pl.col("status").is_in(final_statuses(retry_failed=retry_failed)))["id"]


def recorded_ids(run_dir: str, ids: list[int], parts: Iterable[int] | None = None) -> set[int]:
    """Which of `ids` already have a final outcome recorded (used when a batch is retried);
    `parts`: the partitions they belong to, when known (only those are read)."""
    if not ids:
        return set()
    files = ([f for p in sorted(set(parts)) for f in partition_files(run_dir, p)]
             if parts is not None else journal_files(run_dir))
    journal = _read_parts(files)
    found = journal.filter(pl.col("id").is_in(ids) & pl.col("status").is_in(FINAL_STATUSES))
    return set(found["id"].to_list())


def reset(run_dir: str) -> None:
    """Forget the campaign's ledger (`--restart`): the journal and the consolidated files."""
    storage.delete_dir(ledger_dir(run_dir))
    storage.delete_dir(ledger_file(run_dir))


def fold_partition(run_dir: str, part: int, *, write: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Fold one partition's journal into its consolidated file (one row per recipient) and
    remove the parts it absorbed; `write=False` only reads. Returns the partition's ledger and
    the journal it read."""
    parts = storage.list_files(partition_dir(run_dir, part), ".parquet")
    consolidated = consolidated_file(run_dir, part)
    had_file = storage.exists(consolidated)
    journal = _read_parts([*parts, consolidated] if had_file else parts)
    rows = latest(journal)
    if write and (parts or not had_file):  # a campaign without rows still gets its ledger
        storage.makedirs(ledger_file(run_dir))
        storage.write_table(rows.to_arrow().cast(SCHEMA), consolidated)
        for p in parts:  # only after the consolidated file holds their rows
            storage.delete_file(p)
    return rows, journal


def older_layout(run_dir: str) -> str | None:
    """The file that shows a ledger written by a bulkmail before the ledger was laid out by
    partition (one `ledger.parquet` file, parts directly under `ledger/`), else None. Such a
    ledger is not read by this version: resuming over it would send again."""
    consolidated = ledger_file(run_dir)
    if storage.exists(consolidated) and not storage.is_dir(consolidated):
        return consolidated
    flat = storage.list_files(ledger_dir(run_dir), ".parquet")
    return flat[0] if flat else None


def fold_all(run_dir: str) -> None:
    """Fold every partition, one after the other, in this process (tests and small tools; a run
    folds its partitions in parallel tasks, ledger_stage.py)."""
    for part in partitions_present(run_dir):
        fold_partition(run_dir, part)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
