"""The load stage on the cluster: the input read, validated, deduplicated, suppressed and
resumed by Ray tasks, so that the list never lands on the driver.

    row groups ──map──► validated blocks, cut by address partition (and by id, for the id check)
               ──reduce, one task per address partition──► dedupe, suppression, resume
               ──► rows to send (Ray objects, the send stage's Dataset), ledger rows settled
                   at load (written once the whole input has passed), counts

A list of more than `wave_rows` rows loads in waves of row groups in input order, each twice
the one before (recipients.waves): the ids of every row are checked, the first wave settles as
above and sends; the later ones settle meanwhile (load_waves.py), and `finish` collects them.

The rules are `partitions.py`'s, the tasks `load_tasks.py`'s; this module places them. The
driver holds object references and counts: memory in proportion to blocks × partitions, not
rows.

Why tasks and not Ray Data's `repartition(keys=...)`/`groupby().map_groups()`: on this
machine Ray Data's hash shuffle took 13.6 s for 1M rows and a second one 5.9 s
(docs/ray-notes.md), against about 2 s for these tasks (README, "1,000,000 recipients").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from . import load_tasks, partitions, recipients, storage
from .errors import UsageError
from .load_dataset import READ_TASK_CPUS, READ_TASKS_IN_FLIGHT, Blocks
from .load_tasks import MapResult
from .load_waves import LATER_WAVE_CPUS, Later, Wave, Writer, submit_wave
from .partitions import IdCheck, LoadSummary, PartitionCounts, Rules

FINISH_TIMEOUT = 30.0  # seconds a stopped run waits for a settled wave's rows to be written
# A later wave's map or settle task, and the send stage's read tasks beside it.
_LATER_NEEDS = LATER_WAVE_CPUS + READ_TASKS_IN_FLIGHT * READ_TASK_CPUS


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """The load's outcome on the cluster: counts on the driver, rows in Ray's object store.
    A load in several waves (`later`) has settled its first wave; the others follow."""

    summary: LoadSummary  # of the first wave, in a load in waves
    to_send: list[Any]  # ObjectRefs of Arrow tables: blocks of at most `block_rows` rows
    settled: list[Any]  # ObjectRefs of the ledger rows settled at load, one per partition
    block_rows: int
    blocks: list[Blocks]  # per partition, in order: what `dataset` tells Ray Data of to_send
    later: Later | None = None  # a load in waves: the waves after the first
    input_rows: int = 0  # of the whole input

    @property
    def wave_count(self) -> int:
        return 1 + (len(self.later.planned) if self.later else 0)

    @property
    def waves(self) -> list[Wave]:
        """Every wave of a load in waves (their tasks submitted, if not yet), else none."""
        return [self.later.first, *self.later.submit()] if self.later else []

    @property
    def batches(self) -> int:
        """How many batches the send stage hands out at most: Ray Data joins small blocks (each
        partition's last one) until a batch holds `block_rows`."""
        if self.later:
            return math.ceil(self.input_rows / max(1, self.block_rows))
        if self.block_rows < 1:
            return len(self.to_send)
        return min(len(self.to_send), math.ceil(self.summary.to_send / self.block_rows))

    @property
    def may_send(self) -> bool:
        return self.summary.to_send > 0 or self.later is not None

    def expected(self) -> int:
        """Rows to send: those of the waves settled so far, and at most every input row of the
        others (for progress; never waits)."""
        return self.later.expected(self.summary.to_send) if self.later else self.summary.to_send

    def dataset(self, coordinator: Any = None, gate: Sequence[Any] = ()) -> Any:
        """The rows to send as a Ray Dataset: of the blocks the partitions' tasks cut, or in a
        load in waves, read from each wave's partitions once they have settled. Submits the
        later waves' tasks, the first of them waiting for `gate` (the sender pool up); a read
        that waits stops waiting once `coordinator` says the run is stopping."""
        from . import load_dataset
        if not self.later:
            return load_dataset.dataset_of(self.to_send, self.blocks)
        self.later.submit(gate)
        return load_dataset.dataset_of_waves(self.later.pending(coordinator))


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
         block_rows: int, retry_failed: bool = False, wave_rows: int = 0,
         reserved_cpus: float = 0.0) -> Loaded:
    """Settle every input row's fate on the cluster, in waves of `wave_rows` rows and more
    (recipients.waves; 0: in one). Raises UsageError (one line naming the file or column) when
    a file cannot be read or the ids are unusable; nothing is written then, and nothing has
    been sent. Of a load in waves only the first wave is settled on return (the ids were
    checked over the whole input); a later wave's unreadable file is found by `finish`.
    `reserved_cpus`: what the sender actors will hold; a cluster that would leave the later
    waves' tasks too little of its CPUs loads in one wave (they would never run)."""
    waves = recipients.waves(units, wave_rows)
    if len(waves) > 1 and _spare_cpus(reserved_cpus) >= _LATER_NEEDS:
        return _load_waves(waves, rules=rules, source=source, suppression=suppression,
                           resume_from=resume_from, block_rows=block_rows,
                           retry_failed=retry_failed)
    p = rules.partitions
    opts = _options(source, resume_from)
    maps: list[Any] = [load_tasks.map_rows.options(num_returns=2 * p + 1, **opts).remote(
        chunk, rules, True) for chunk in load_tasks.chunks(units)]
    id_checks = ([load_tasks.check_ids.remote(*[m[p + q] for m in maps]) for q in range(p)]
                 if rules.has_id else [])
    keys = partitions.split_suppression(suppression, p)
    streams = [load_tasks.settle.options(**opts).remote(
        k, rules, keys[k], resume_from, retry_failed, block_rows, *[m[k] for m in maps])
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
    """The id check over every row, then the first wave, settled; the later waves planned
    (load_waves.Later)."""
    p = rules.partitions
    opts = _options(source, resume_from)
    where = f"--input {source}"
    if rules.has_id:  # every id checked before anything is sent
        maps: list[Any] = [load_tasks.map_ids.options(num_returns=p + 1, **opts).remote(chunk, p)
                           for chunk in load_tasks.chunks([u for w in waves for u in w])]
        checks = [load_tasks.check_ids.remote(*[m[q] for m in maps]) for q in range(p)]
        _raise_for(ray.get([m[-1] for m in maps]), IdCheck(), where)  # unreadable, null
        check = partitions.merge_id_checks(ray.get(checks))
        if check.first is not None:  # read the two rows' addresses only now
            id_, r0, r1, _ = check.first
            same = ray.get(load_tasks.same_address.options(**opts).remote(
                [u for w in waves for u in w], [r0, r1]))
            check = dataclasses.replace(check, first=(id_, r0, r1, same))
        _raise_for([], check, where)
    keys = partitions.split_suppression(suppression, p)
    keepers: list[list[Any]] = [[] for _ in range(p)]
    first = submit_wave(waves[0], rules=rules, options=opts, suppression=keys,
                        resume_from=resume_from, retry_failed=retry_failed, keepers=keepers)
    _raise_for(ray.get(first.results), IdCheck(), where)
    summary = partitions.summarise(ray.get(first.counts), fields=rules.fields, partitions=p)
    later = Later(waves[1:], first=first, keepers=keepers, rules=rules,
                  options=opts, suppression=keys, resume_from=resume_from,
                  retry_failed=retry_failed)
    return Loaded(summary=summary, to_send=[], settled=first.settled, block_rows=block_rows,
                  blocks=[], later=later, input_rows=sum(u.rows for w in waves for u in w))


def write_settled(loaded: Loaded, *, run_dir: str, run_id: str, epoch: int) -> int:
    """Write the rows settled at load into the ledger, one task per partition; of a load in
    waves, the first wave's, and the later waves' as each settles (`finish` waits for them)."""
    env = storage.runtime_env(run_dir)
    options: dict[str, Any] = {"runtime_env": env} if env else {}
    task = load_tasks.write_settled.options(**options)
    written: int = sum(ray.get([task.remote(run_dir, ref, run_id, epoch, f"load-{run_id}")
                                for ref, n in zip(loaded.settled, loaded.summary.settled_sizes,
                                                  strict=True) if n]))
    if loaded.later:
        loaded.later.write_with(Writer(run_dir=run_dir, run_id=run_id, epoch=epoch,
                                       options=options))
    return written


def finish(loaded: Loaded, *, wait: bool = True) -> tuple[LoadSummary, str | None]:
    """The whole load's summary once every wave has settled and its settled rows are written,
    and the first later wave that could not be loaded (None if none: see Later.finish).
    `wait` False (a stopped run): only the waves already settled; the rest are cancelled and
    settled again, the same way, by the resume."""
    if not loaded.later:
        return loaded.summary, None
    counts, error = loaded.later.finish(wait=wait, timeout=FINISH_TIMEOUT)
    first = list(ray.get(loaded.later.first.counts))
    summary = partitions.summarise(first + counts, fields=loaded.summary.fields,
                                   partitions=loaded.summary.partitions, waves=loaded.wave_count)
    return summary, error


@ray.remote
def _head(table: pa.Table, n: int) -> pa.Table:
    return table.slice(0, n)


def take(loaded: Loaded, n: int) -> pl.DataFrame:
    """The first `n` rows to send in input order (each partition keeps it), for a dry run."""
    heads = [_head.remote(ref, n) for ref in loaded.to_send]
    if not heads or n <= 0:
        return pl.DataFrame()
    frames = [load_tasks.frame_of(t) for t in ray.get(heads)]
    return pl.concat(frames).sort("_row").head(n).drop(partitions.PART, "_row")


def _options(*paths: str | None) -> dict[str, Any]:
    env = storage.runtime_env(*paths)
    return {"runtime_env": env} if env else {}


def _spare_cpus(reserved: float) -> float:
    return load_tasks.cluster_cpus() - reserved
