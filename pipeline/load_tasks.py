"""The load's Ray tasks: what runs on the cluster, one row group, one address partition or one
id partition at a time. The rules are `partitions.py`'s; `load_stage.py` (one wave) and
`load_waves.py` (the waves after the first) place these tasks and wire their objects.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from . import ledger, partitions, recipients
from .errors import UsageError
from .load_dataset import Blocks
from .partitions import IdCheck, PartitionCounts, Rules

ROWS_PER_MAP_TASK = 1_000_000  # rows one map task reads and cuts (a few hundred MB at most)


def frame_of(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


@dataclass(frozen=True, kw_only=True)
class MapResult:
    rows: int = 0
    null_ids: int = 0
    first_null_row: int | None = None
    error: str | None = None  # a file that cannot be read, as one line


@ray.remote(max_retries=3)
def map_rows(units: Sequence[recipients.Unit], rules: Rules, ids: bool,
             *after: Any) -> tuple[Any, ...]:
    """Read row groups, validate them, and cut them by address partition (full rows) and, with
    `ids`, by id partition (id, row, address hash); the last return value is a MapResult.
    `after`: Ray objects this task waits for (a wave's maps start once the wave before it has
    settled), unused."""
    p = rules.partitions
    empty = (pa.table({}),) * (2 * p if ids else p)
    frames = []
    for unit in units:
        try:
            frame = recipients.read_unit(unit)
        except UsageError as exc:
            return (*empty, MapResult(error=str(exc)))
        frames.append(partitions.validate(frame, rules=rules, first_row=unit.first_row))
    if not frames:  # an input without rows
        frames.append(partitions.validate(pl.DataFrame(schema=rules.schema), rules=rules,
                                          first_row=0))
    block = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    nulls, first_null = partitions.null_ids(block)
    by_address = [f.to_arrow() for f in partitions.split(block, p)]
    by_id = (cut_by_id(partitions.id_keys(block.filter(pl.col("id").is_not_null())), p)
             if ids else [])
    return (*by_address, *by_id,
            MapResult(rows=block.height, null_ids=nulls, first_null_row=first_null))


def cut_by_id(keys: pl.DataFrame, p: int) -> list[pa.Table]:
    keyed = keys.with_columns(((pl.col("id") % p + p) % p).cast(pl.Int32).alias(partitions.PART))
    return [f.drop(partitions.PART).to_arrow() for f in partitions.split(keyed, p)]


@ray.remote(max_retries=3)
def map_ids(units: Sequence[recipients.Unit], p: int) -> tuple[Any, ...]:
    """The id check's map for a load in waves: only the `id` column of every row, read before
    the first wave sends, cut by id partition; the last return value a MapResult."""
    frames = []
    for unit in units:
        try:
            frame = recipients.read_unit(unit, ["id"])
        except UsageError as exc:
            return (*(pa.table({}),) * p, MapResult(error=str(exc)))
        if "id" not in frame.columns:  # a file without the column, beside others that have it
            frame = pl.DataFrame({"id": [None] * unit.rows}, schema={"id": pl.Int64})
        frames.append(partitions.id_block(frame, first_row=unit.first_row))
    block = (pl.concat(frames) if frames
             else pl.DataFrame(schema={"id": pl.Int64, "_row": pl.Int64}))
    nulls, first_null = partitions.null_ids(block)
    return (*cut_by_id(block.filter(pl.col("id").is_not_null()), p),
            MapResult(rows=block.height, null_ids=nulls, first_null_row=first_null))


@ray.remote(max_retries=3)
def same_address(units: Sequence[recipients.Unit], rows: Sequence[int]) -> bool:
    """Whether two rows of the input (by place) hold one address for the dedupe."""
    emails: list[str | None] = []
    for row in rows:
        unit = next(u for u in units if u.first_row <= row < u.first_row + u.rows)
        emails.append(recipients.read_unit(unit, ["email"])["email"][row - unit.first_row])
    return partitions.same_address(emails)


@ray.remote(num_returns="streaming", max_retries=3)
def settle(part: int, rules: Rules, suppression: pl.Series | None, resume_from: str | None,
           retry_failed: bool, block_rows: int, *pieces: pa.Table) -> Iterator[Any]:
    """One address partition: dedupe, suppression and, reading only this partition's ledger,
    the resume. Yields its PartitionCounts, its settled ledger rows, the Blocks (shapes) of its
    rows to send, then those rows in blocks of `block_rows` (the send stage's batch: one block
    goes to one actor at a time)."""
    frames = [frame_of(t) for t in pieces if t.num_rows]
    if not frames:
        yield _stamped(PartitionCounts())
        yield pa.table({})
        yield Blocks(schema=pa.schema([]), shapes=())
        return
    done = (ledger.done_ids(resume_from, part, retry_failed=retry_failed)
            if resume_from is not None else None)
    out = partitions.settle(frames, fields=rules.fields, suppression=suppression, done=done)
    yield _stamped(out.summary)
    yield out.settled.to_arrow()
    table = out.to_send.to_arrow()
    blocks = [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)]
    yield Blocks(schema=table.schema, shapes=tuple((b.num_rows, b.nbytes) for b in blocks))
    # A loop, not `yield from blocks`: Ray drives the generator with send(), which a list's
    # iterator lacks. Ray serialises only each slice's rows.
    for block in blocks:  # noqa: UP028
        yield block


@ray.remote(num_returns=4, max_retries=3)
def settle_wave(part: int, rules: Rules, suppression: pl.Series | None, resume_from: str | None,
                retry_failed: bool, maps: int, *pieces: pa.Table) -> tuple[Any, ...]:
    """One address partition of one wave of a load in waves: `pieces` holds the wave's `maps`
    pieces of this partition, then the keepers of each earlier wave. Returns its
    PartitionCounts, settled ledger rows, keepers (for the waves after) and rows to send."""
    frames = [frame_of(t) for t in pieces[:maps] if t.num_rows]
    if not frames:
        return _stamped(PartitionCounts()), pa.table({}), pa.table({}), pa.table({})
    done = (ledger.done_ids(resume_from, part, retry_failed=retry_failed)
            if resume_from is not None else None)
    out = partitions.settle(frames, fields=rules.fields, suppression=suppression, done=done,
                            earlier=[frame_of(t) for t in pieces[maps:] if t.num_rows])
    return (_stamped(out.summary), out.settled.to_arrow(), out.keepers.to_arrow(),
            out.to_send.to_arrow())


def _stamped(counts: PartitionCounts) -> PartitionCounts:
    """`counts` with the time its partition settled: the report's "list loaded after"."""
    return dataclasses.replace(counts, settled_at=time.time())


@ray.remote(num_cpus=0)
def wave_ok(before: bool, *results: MapResult) -> bool:
    """This wave's files and every earlier wave's read cleanly: its rows may be sent."""
    return before and not any(r.error for r in results)


@ray.remote(max_retries=3)
def check_ids(*pieces: pa.Table) -> IdCheck:
    return partitions.check_ids([frame_of(t) for t in pieces if t.num_rows])


# A quarter of a CPU: later waves' rows are written while the senders hold theirs.
@ray.remote(num_cpus=0.25, max_retries=3)
def write_settled(run_dir: str, table: pa.Table, run_id: str, epoch: int, name: str,
                  ok: bool = True) -> int:
    if table.num_rows == 0 or not ok:  # not ok: a broken wave, or one after it (finish)
        return 0
    frame = frame_of(table).with_columns(run=pl.lit(run_id), epoch=pl.lit(epoch, pl.Int64))
    ledger.write_frame(run_dir, frame, name=name)
    return int(table.num_rows)


def chunks(units: Sequence[recipients.Unit]) -> list[list[recipients.Unit]]:
    """The units of one load (or wave) dealt to its map tasks."""
    rows = sum(u.rows for u in units)
    tasks = max(1, min(len(units), max(cpus(), math.ceil(rows / ROWS_PER_MAP_TASK))))
    return [list(units[i::tasks]) for i in range(tasks)]


def cluster_cpus() -> float:
    """The cluster's logical CPUs (1 if Ray cannot say)."""
    try:
        return float(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001
        return 1.0


def cpus() -> int:
    return max(1, int(cluster_cpus()))
