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
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from . import ledger, partitions, recipients, storage
from .errors import UsageError
from .load_dataset import Blocks, Pending
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
def _map(units: Sequence[recipients.Unit], rules: Rules, ids: bool, *after: Any) -> tuple[Any, ...]:
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
    by_id = _by_id(partitions.id_keys(block.filter(pl.col("id").is_not_null())), p) if ids else []
    return (*by_address, *by_id,
            MapResult(rows=block.height, null_ids=nulls, first_null_row=first_null))


def _by_id(keys: pl.DataFrame, p: int) -> list[pa.Table]:
    keyed = keys.with_columns(((pl.col("id") % p + p) % p).cast(pl.Int32).alias(partitions.PART))
    return [f.drop(partitions.PART).to_arrow() for f in partitions.split(keyed, p)]


@ray.remote(max_retries=3)
def _map_ids(units: Sequence[recipients.Unit], p: int) -> tuple[Any, ...]:
    """The id check's map for a load in waves: only the `id` and `email` columns of every row,
    read before the first wave sends, cut by id partition; the last return value a MapResult."""
    frames = []
    for unit in units:
        try:
            frames.append(partitions.id_block(recipients.read_unit(unit, ["id", "email"]),
                                              first_row=unit.first_row))
        except UsageError as exc:
            return (*(pa.table({}),) * p, MapResult(error=str(exc)))
    block = pl.concat(frames) if frames else pl.DataFrame(
        schema={"id": pl.Int64, "_row": pl.Int64, "_h": pl.UInt64})
    nulls, first_null = partitions.null_ids(block)
    return (*_by_id(block.filter(pl.col("id").is_not_null()), p),
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


@ray.remote(num_returns=4, max_retries=3)
def _settle_wave(part: int, rules: Rules, suppression: pl.Series | None, resume_from: str | None,
                 retry_failed: bool, maps: int, *pieces: pa.Table) -> tuple[Any, ...]:
    """One address partition of one wave of a load in waves: `pieces` holds the wave's `maps`
    pieces of this partition, then the keepers of each earlier wave. Returns its
    PartitionCounts, settled ledger rows, keepers (for the waves after) and rows to send."""
    frames = [_frame(t) for t in pieces[:maps] if t.num_rows]
    if not frames:
        return PartitionCounts(), pa.table({}), pa.table({}), pa.table({})
    done = (ledger.done_ids(resume_from, part, retry_failed=retry_failed)
            if resume_from is not None else None)
    out = partitions.settle(frames, fields=rules.fields, suppression=suppression, done=done,
                            earlier=[_frame(t) for t in pieces[maps:] if t.num_rows])
    return out.summary, out.settled.to_arrow(), out.keepers.to_arrow(), out.to_send.to_arrow()


@ray.remote(num_cpus=0)
def _wave_ok(before: bool, *results: MapResult) -> bool:
    return before and not any(r.error for r in results)


@ray.remote(max_retries=3)
def _check_ids(*pieces: pa.Table) -> IdCheck:
    return partitions.check_ids([_frame(t) for t in pieces if t.num_rows])


@ray.remote(max_retries=3)
def _write_settled(run_dir: str, table: pa.Table, run_id: str, epoch: int, name: str,
                   ok: bool = True) -> int:
    if table.num_rows == 0 or not ok:  # not ok: a broken wave, or one after it (finish)
        return 0
    frame = _frame(table).with_columns(run=pl.lit(run_id), epoch=pl.lit(epoch, pl.Int64))
    ledger.write_frame(run_dir, frame, name=name)
    return int(table.num_rows)


@dataclass(frozen=True, kw_only=True)
class Wave:
    """One wave of a load in waves, as Ray objects: its tasks run while earlier waves send."""

    rows: int  # input rows
    ok: Any  # True once this wave and every one before it loaded cleanly
    results: list[Any]  # the MapResults of its maps
    counts: list[Any]  # PartitionCounts, per partition
    settled: list[Any]  # ledger rows settled at load, per partition
    to_send: list[Any]  # rows to send, one table per partition


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """The load's outcome on the cluster: counts on the driver, rows in Ray's object store.
    A load in several waves (`waves`) has settled its first wave; the others follow."""

    summary: LoadSummary  # of the first wave, in a load in waves
    to_send: list[Any]  # ObjectRefs of Arrow tables: blocks of at most `block_rows` rows
    settled: list[Any]  # ObjectRefs of the ledger rows settled at load, one per partition
    block_rows: int
    blocks: list[Blocks]  # per partition, in order: what `dataset` tells Ray Data of to_send
    waves: tuple[Wave, ...] = ()  # a load in waves: all of them, the first one too
    input_rows: int = 0  # of the whole input
    writes: list[Any] = field(default_factory=list)  # the later waves' settled rows being written
    _settled: dict[int, int] = field(default_factory=dict)  # wave: rows to send, once known

    @property
    def batches(self) -> int:
        """How many batches the send stage hands out at most: Ray Data joins small blocks (each
        partition's last one) until a batch holds `block_rows`."""
        if self.waves:
            return math.ceil(self.input_rows / max(1, self.block_rows))
        if self.block_rows < 1:
            return len(self.to_send)
        return min(len(self.to_send), math.ceil(self.summary.to_send / self.block_rows))

    @property
    def may_send(self) -> bool:
        return self.summary.to_send > 0 or len(self.waves) > 1

    def expected(self) -> int:
        """Rows to send: those of the waves settled so far, and at most every input row of the
        others (for progress; never waits)."""
        if not self.waves:
            return self.summary.to_send
        for w, wave in enumerate(self.waves):
            if w not in self._settled:
                ready, _ = ray.wait(wave.counts, num_returns=len(wave.counts), timeout=0)
                if len(ready) == len(wave.counts):
                    self._settled[w] = sum(c.to_send for c in ray.get(wave.counts))
        return sum(self._settled.get(w, wave.rows) for w, wave in enumerate(self.waves))

    def dataset(self) -> Any:
        """The rows to send as a Ray Dataset: of the blocks the partitions' tasks cut, or in a
        load in waves, read from each wave's partitions once they have settled."""
        from . import load_dataset
        if not self.waves:
            return load_dataset.dataset_of(self.to_send, self.blocks)
        parts = [Pending(ok=w.ok, rows=r, size_bytes=w.rows * 100 // len(w.to_send))
                 for w in self.waves for r in w.to_send]
        return load_dataset.dataset_of_waves(parts)


def _chunks(units: Sequence[recipients.Unit]) -> list[list[recipients.Unit]]:
    """The units of one load (or wave) dealt to its map tasks."""
    rows = sum(u.rows for u in units)
    tasks = max(1, min(len(units), max(_cpus(), math.ceil(rows / ROWS_PER_MAP_TASK))))
    return [list(units[i::tasks]) for i in range(tasks)]


def _raise_for(results: Sequence[MapResult], check: IdCheck, where: str) -> None:
    for r in results:
        if r.error:
            raise UsageError(r.error)
    nulls = [r for r in results if r.null_ids]
    if nulls:
        first = min(r.first_null_row for r in nulls if r.first_null_row is not None)
        raise UsageError(f"{where}: column 'id' has {sum(r.null_ids for r in nulls):,} empty or "
                         f"out-of-range values (first at row {first}); ids must be integers in "
                         "int64 range")
    if check.first is not None:
        id_, r0, r1, same = check.first
        what = "the same address" if same else "different addresses"
        raise UsageError(
            f"{where}: column 'id' repeats ({check.repeated:,} ids; e.g. id {id_} on rows "
            f"{r0} and {r1}, with {what}); ids must be unique, or drop the column to number "
            "the rows")


def load(units: Sequence[recipients.Unit], *, rules: Rules, source: str,
         suppression: pl.DataFrame | None, resume_from: str | None,
         block_rows: int, retry_failed: bool = False, wave_rows: int = 0) -> Loaded:
    """Settle every input row's fate on the cluster, in waves of `wave_rows` rows and more
    (recipients.waves; 0: in one). Raises UsageError (one line naming the file or column) when a file
    cannot be read or the ids are unusable; nothing is written then, and nothing has been sent.
    Of a load in waves, only the first wave is settled on return, and the ids were checked over
    the whole input; a later wave's unreadable file is found by `finish`."""
    waves = recipients.waves(units, wave_rows)
    if len(waves) > 1:
        return _load_waves(waves, rules=rules, source=source, suppression=suppression,
                           resume_from=resume_from, block_rows=block_rows,
                           retry_failed=retry_failed)
    p = rules.partitions
    env = storage.runtime_env(source, resume_from)
    opts: dict[str, Any] = {"runtime_env": env} if env else {}
    maps: list[Any] = [_map.options(num_returns=2 * p + 1, **opts).remote(chunk, rules, True)
                       for chunk in _chunks(units)]
    id_checks = ([_check_ids.remote(*[m[p + q] for m in maps]) for q in range(p)]
                 if rules.has_id else [])
    keys = partitions.split_suppression(suppression, p)
    streams = [_settle.options(**opts).remote(k, rules, keys[k], resume_from, retry_failed,
                                              block_rows, *[m[k] for m in maps])
               for k in range(p)]
    _raise_for(ray.get([m[-1] for m in maps]), partitions.merge_id_checks(ray.get(id_checks)),
               f"--input {source}")
    # Each stream: counts, settled rows, the Blocks, then the blocks to send.
    outputs = [list(stream) for stream in streams]
    counts: list[PartitionCounts] = ray.get([o[0] for o in outputs])
    summary = partitions.summarise(counts, fields=rules.fields, partitions=p)
    return Loaded(summary=summary, to_send=[ref for o in outputs for ref in o[3:]],
                  settled=[o[1] for o in outputs], block_rows=block_rows,
                  blocks=ray.get([o[2] for o in outputs]), input_rows=summary.input_rows)


def _load_waves(waves: list[list[recipients.Unit]], *, rules: Rules, source: str,
                suppression: pl.DataFrame | None, resume_from: str | None, block_rows: int,
                retry_failed: bool) -> Loaded:
    """Every wave's tasks, submitted at once: a wave's maps wait for the wave before it to
    settle (so the first wave has the cluster to itself, and later ones use what sending
    leaves), its partitions' settles take the keepers of every earlier wave (first row of an
    address wins: a later wave's row of it is a duplicate)."""
    p = rules.partitions
    env = storage.runtime_env(source, resume_from)
    opts: dict[str, Any] = {"runtime_env": env} if env else {}
    where = f"--input {source}"
    if rules.has_id:  # every id checked before anything is sent
        maps: list[Any] = [_map_ids.options(num_returns=p + 1, **opts).remote(chunk, p)
                           for chunk in _chunks([u for wave in waves for u in wave])]
        checks = [_check_ids.remote(*[m[q] for m in maps]) for q in range(p)]
        _raise_for(ray.get([m[-1] for m in maps]), partitions.merge_id_checks(ray.get(checks)),
                   where)
    keys = partitions.split_suppression(suppression, p)
    keepers: list[list[Any]] = [[] for _ in range(p)]
    out: list[Wave] = []
    ok: Any = True
    gate: list[Any] = []
    for w, wave in enumerate(waves):
        # After the first wave, the senders hold a CPU share each: these tasks take half a CPU.
        later = {"num_cpus": 0.5} if w else {}
        maps = [_map.options(num_returns=p + 1, **opts, **later).remote(chunk, rules, False,
                                                                         *gate)
                for chunk in _chunks(wave)]
        settles: list[Any] = [_settle_wave.options(**opts, **later).remote(
            k, rules, keys[k], resume_from, retry_failed, len(maps), *[m[k] for m in maps],
            *keepers[k]) for k in range(p)]
        for k in range(p):
            keepers[k].append(settles[k][2])
        results = [m[-1] for m in maps]
        ok = _wave_ok.remote(ok, *results)
        gate = [s[0] for s in settles]
        out.append(Wave(rows=sum(u.rows for u in wave), ok=ok, results=results, counts=gate,
                        settled=[s[1] for s in settles], to_send=[s[3] for s in settles]))
    first = out[0]
    _raise_for(ray.get(first.results), IdCheck(), where)
    summary = partitions.summarise(ray.get(first.counts), fields=rules.fields, partitions=p)
    return Loaded(summary=summary, to_send=[], settled=first.settled, block_rows=block_rows,
                  blocks=[], waves=tuple(out), input_rows=sum(w.rows for w in out))


def write_settled(loaded: Loaded, *, run_dir: str, run_id: str, epoch: int) -> int:
    """Write the rows settled at load into the ledger, one task per partition; of a load in
    waves, the first wave's, and the later waves' as each settles (`finish` waits for them)."""
    env = storage.runtime_env(run_dir)
    task = _write_settled.options(runtime_env=env) if env else _write_settled
    name = f"load-{run_id}"
    written: int = sum(ray.get([task.remote(run_dir, ref, run_id, epoch, name)
                           for ref, n in zip(loaded.settled, loaded.summary.settled_sizes,
                                             strict=True) if n]))
    for w, wave in enumerate(loaded.waves[1:], start=1):
        loaded.writes.append([task.remote(run_dir, ref, run_id, epoch, f"{name}-wave{w}", wave.ok)
                              for ref in wave.settled])
    return written


def finish(loaded: Loaded, *, wait: bool = True) -> tuple[LoadSummary, str | None]:
    """The whole load's summary once every wave has settled and its settled rows are written,
    and the first unreadable file of a later wave (None if none): neither that wave's rows nor
    those of the waves after it were sent or recorded, and a run of the campaign once it is
    fixed sends them. `wait` False (a stopped run): only the waves already done; the rest are
    settled again, the same way, by the resume."""
    if not loaded.waves:
        return loaded.summary, None
    counts: list[PartitionCounts] = list(ray.get(loaded.waves[0].counts))
    error = None
    for w, wave in enumerate(loaded.waves[1:]):
        writes = loaded.writes[w] if w < len(loaded.writes) else []  # none before write_settled
        refs = [wave.ok, *wave.counts, *writes]
        if not wait and len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            break
        if not ray.get(wave.ok):
            error = next((r.error for r in ray.get(wave.results) if r.error), None)
            break
        ray.get(writes)
        counts += ray.get(wave.counts)
    summary = partitions.summarise(counts, fields=loaded.summary.fields,
                                   partitions=loaded.summary.partitions)
    return summary, error


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
