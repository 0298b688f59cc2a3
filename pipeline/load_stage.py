"""The load stage on the cluster: the input read, validated, deduplicated, suppressed and
resumed by Ray tasks, so that the list never lands on the driver.

    row groups ──map──► validated blocks, cut by address partition (and by id, for the id check)
               ──reduce, one task per address partition──► dedupe, suppression, resume
               ──► rows to send (Ray objects, the send stage's Dataset), ledger rows settled
                   at load (written once the whole input has passed), counts

The rules are `partitions.py`'s; this module only places them on the cluster. The driver holds
object references and counts: memory in proportion to blocks × partitions, not rows.

Why tasks and not Ray Data's `repartition(keys=...)`/`groupby().map_groups()`: on this
machine Ray Data's hash shuffle took 13.6 s for 1M rows and a second one 5.9 s
(docs/ray-notes.md), against about 2 s for these tasks (README, "1,000,000 recipients").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from . import ledger, partitions, recipients, storage
from .errors import UsageError
from .partitions import IdCheck, LoadSummary, PartitionCounts, Rules

ROWS_PER_MAP_TASK = 1_000_000  # rows one map task reads and cuts (a few hundred MB at most)


def _frame(table: pa.Table) -> pl.DataFrame:
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
def _map(units: Sequence[recipients.Unit], rules: Rules) -> tuple[Any, ...]:
    """Read row groups, validate them, and cut them by address partition (full rows) and by
    id partition (id, row, address hash); the last return value is a MapResult."""
    p = rules.partitions
    empty = (pa.table({}),) * (2 * p)
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
    keys = partitions.id_keys(block.filter(pl.col("id").is_not_null()))
    keyed = keys.with_columns(((pl.col("id") % p + p) % p).cast(pl.Int32).alias(partitions.PART))
    by_id = [f.drop(partitions.PART).to_arrow() for f in partitions.split(keyed, p)]
    return (*by_address, *by_id,
            MapResult(rows=block.height, null_ids=nulls, first_null_row=first_null))


@ray.remote(num_returns="streaming", max_retries=3)
def _settle(part: int, rules: Rules, suppression: pl.Series | None, resume_from: str | None,
            retry_failed: bool, block_rows: int, *pieces: pa.Table) -> Iterator[Any]:
    """One address partition: dedupe, suppression and, reading only this partition's ledger,
    the resume. Yields its PartitionCounts, its settled ledger rows, the Blocks (shapes) of its
    rows to send, then those rows in blocks of `block_rows` (the send stage's batch: one block
    goes to one actor at a time)."""
    frames = [_frame(t) for t in pieces if t.num_rows]
    if not frames:
        yield PartitionCounts()
        yield pa.table({})
        yield Blocks(schema=pa.schema([]), shapes=())
        return
    done = (ledger.done_ids(resume_from, part, retry_failed=retry_failed)
            if resume_from is not None else None)
    out = partitions.settle(frames, fields=rules.fields, suppression=suppression, done=done)
    yield out.summary
    yield out.settled.to_arrow()
    table = out.to_send.to_arrow()
    blocks = [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)]
    yield Blocks(schema=table.schema, shapes=tuple((b.num_rows, b.nbytes) for b in blocks))
    # A loop, not `yield from blocks`: Ray drives the generator with send(), which a list's
    # iterator lacks. Ray serialises only each slice's rows.
    for block in blocks:  # noqa: UP028
        yield block


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """What Ray Data needs to know of one partition's blocks to send: their schema, and each
    block's rows and bytes."""

    schema: pa.Schema
    shapes: tuple[tuple[int, int], ...]


@ray.remote(max_retries=3)
def _check_ids(*pieces: pa.Table) -> IdCheck:
    return partitions.check_ids([_frame(t) for t in pieces if t.num_rows])


@ray.remote(max_retries=3)
def _write_settled(run_dir: str, table: pa.Table, run_id: str, epoch: int) -> int:
    if table.num_rows == 0:
        return 0
    name = f"load-{run_id}"
    frame = _frame(table).with_columns(run=pl.lit(run_id), epoch=pl.lit(epoch, pl.Int64))
    ledger.write_frame(run_dir, frame, name=name)
    return int(table.num_rows)


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """The load's outcome on the cluster: counts on the driver, rows in Ray's object store."""

    summary: LoadSummary
    to_send: list[Any]  # ObjectRefs of Arrow tables: blocks of at most `block_rows` rows
    settled: list[Any]  # ObjectRefs of the ledger rows settled at load, one per partition
    block_rows: int
    blocks: list[Blocks]  # per partition, in order: what `dataset` tells Ray Data of to_send

    @property
    def batches(self) -> int:
        """How many batches the send stage hands out at most: Ray Data joins small blocks (each
        partition's last one) until a batch holds `block_rows`."""
        if self.block_rows < 1:
            return len(self.to_send)
        return min(len(self.to_send), math.ceil(self.summary.to_send / self.block_rows))

    def dataset(self) -> Any:
        """The rows to send as a Ray Dataset of the blocks the partitions' tasks cut."""
        return dataset_of(self.to_send, self.blocks)


def dataset_of(refs: list[Any], blocks: Sequence[Blocks]) -> Any:
    """A Ray Dataset of Arrow blocks already in the object store, described by their `blocks`.

    `ray.data.from_arrow_refs` asks each block for its metadata in a task of its own: 80 tasks
    for 1M rows, in workers that first import Ray Data (about 1 s of CPU each), 0.5-1 s of wall
    on 2 cores before the first email (docs/ray-notes.md). The partitions' tasks already know
    every block's rows and bytes, so this builds the same Dataset from those, as
    `from_arrow_refs` does (Ray 2.60's read_api.py; Ray is pinned in pyproject.toml)."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data.block import BlockMetadataWithSchema, BlockStats
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset
    metadata = [BlockMetadataWithSchema(num_rows=rows, size_bytes=size, exec_stats=None,
                                        input_files=None, schema=b.schema)
                for b in blocks for rows, size in b.shapes]
    if len(metadata) != len(refs):
        raise RuntimeError(f"internal: {len(refs)} blocks to send but {len(metadata)} described")
    as_stats: list[BlockStats] = list(metadata)
    stats = DatasetStats(metadata={"FromArrow": as_stats}, parent=None)
    context = DataContext.get_current().copy()
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metadata), context), context, stats)


def load(units: Sequence[recipients.Unit], *, rules: Rules, source: str,
         suppression: pl.DataFrame | None, resume_from: str | None,
         block_rows: int, retry_failed: bool = False) -> Loaded:
    """Settle every input row's fate on the cluster. Raises UsageError (one line naming the
    file or column) when a file cannot be read or the ids are unusable; nothing is written
    then, and nothing has been sent."""
    p = rules.partitions
    env = storage.runtime_env(source, resume_from)
    opts: dict[str, Any] = {"runtime_env": env} if env else {}
    rows = sum(u.rows for u in units)
    tasks = max(1, min(len(units), max(_cpus(), math.ceil(rows / ROWS_PER_MAP_TASK))))
    chunks = [list(units[i::tasks]) for i in range(tasks)]
    maps: list[Any] = [_map.options(num_returns=2 * p + 1, **opts).remote(chunk, rules)
                       for chunk in chunks]
    id_checks = ([_check_ids.remote(*[m[p + q] for m in maps]) for q in range(p)]
                 if rules.has_id else [])
    keys = partitions.split_suppression(suppression, p)
    streams = [_settle.options(**opts).remote(k, rules, keys[k], resume_from, retry_failed,
                                              block_rows, *[m[k] for m in maps])
               for k in range(p)]

    results: list[MapResult] = ray.get([m[-1] for m in maps])
    where = f"--input {source}"
    for r in results:
        if r.error:
            raise UsageError(r.error)
    nulls = [r for r in results if r.null_ids]
    if nulls:
        first = min(r.first_null_row for r in nulls if r.first_null_row is not None)
        raise UsageError(f"{where}: column 'id' has {sum(r.null_ids for r in nulls):,} empty or "
                         f"out-of-range values (first at row {first}); ids must be integers in "
                         "int64 range")
    check = partitions.merge_id_checks(ray.get(id_checks))
    if check.first is not None:
        id_, r0, r1, same = check.first
        what = "the same address" if same else "different addresses"
        raise UsageError(
            f"{where}: column 'id' repeats ({check.repeated:,} ids; e.g. id {id_} on rows "
            f"{r0} and {r1}, with {what}); ids must be unique, or drop the column to number "
            "the rows")
    # Each stream: counts, settled rows, the Blocks, then the blocks to send.
    outputs = [list(stream) for stream in streams]
    counts: list[PartitionCounts] = ray.get([o[0] for o in outputs])
    summary = partitions.summarise(counts, fields=rules.fields, partitions=p)
    return Loaded(summary=summary, to_send=[ref for o in outputs for ref in o[3:]],
                  settled=[o[1] for o in outputs], block_rows=block_rows,
                  blocks=ray.get([o[2] for o in outputs]))


def write_settled(loaded: Loaded, *, run_dir: str, run_id: str, epoch: int) -> int:
    """Write the rows settled at load into the ledger, one task per partition."""
    env = storage.runtime_env(run_dir)
    task = _write_settled.options(runtime_env=env) if env else _write_settled
    return sum(ray.get([task.remote(run_dir, ref, run_id, epoch)
                        for ref, n in zip(loaded.settled, loaded.summary.settled_sizes,
                                          strict=True) if n]))


@ray.remote
def _head(table: pa.Table, n: int) -> pa.Table:
    return table.slice(0, n)


def take(loaded: Loaded, n: int) -> pl.DataFrame:
    """The first `n` rows to send in input order (each partition keeps it), for a dry run."""
    heads = [_head.remote(ref, n) for ref in loaded.to_send]
    if not heads or n <= 0:
        return pl.DataFrame()
    frames = [_frame(t) for t in ray.get(heads)]
    return pl.concat(frames).sort("_row").head(n).drop(partitions.PART, "_row")


def _cpus() -> int:
    try:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001
        return 1
