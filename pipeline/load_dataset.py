"""The load's rows to send as the Ray Dataset the send stage maps over.

Two shapes, one per way the load ran (load_stage.py): blocks already in the object store (a
load in one wave), or a read whose tasks each wait for one partition of one wave to settle
(a load in several waves), so that the send stage starts on the first wave while the later
ones still load.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

# Ray Data is imported inside the functions that build a Dataset: the load's task workers
# import this module for `Blocks`, and Ray Data costs each of them about 1 s of CPU.

# Each read task only fetches a settled table and slices it; two in flight keep the actors fed
# on 2 cores, and more would each hold a worker process while it waits for its wave.
READ_TASKS_IN_FLIGHT = 2
READ_TASK_CPUS = 0.1  # the senders may hold every CPU but one (ray_session.start)
WAIT_POLL = 0.5  # seconds between a waiting read task's looks at the stop flag


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """What Ray Data needs to know of one partition's blocks to send: their schema, and each
    block's rows and bytes."""

    schema: pa.Schema
    shapes: tuple[tuple[int, int], ...]


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


@dataclass(frozen=True, kw_only=True)
class Pending:
    """One partition of one wave, not necessarily settled yet: `ok` (a Ray object: True when
    this wave and every one before it read cleanly), its rows to send (a Ray object: an Arrow
    table), about how many bytes they take (for Ray Data's memory budget), and the run's
    coordinator (actors.Coordinator), asked while waiting whether the run is stopping."""

    ok: Any
    rows: Any
    size_bytes: int
    stop: Any = None


def _read(part: Pending) -> Iterator[pa.Table]:
    # One table, not slices of a batch: Ray Data joins what a read task yields into blocks of
    # up to 128 MB anyway, and map_batches cuts the batches from them.
    try:
        while len(ray.wait([part.ok, part.rows], num_returns=2, timeout=WAIT_POLL)[0]) < 2:
            if part.stop is not None and ray.get(part.stop.stop_asked.remote()):
                return  # a stop: the send stage ends without waiting for this wave
        if ray.get(part.ok):  # else a broken wave, or one after it: none of it is sent
            yield ray.get(part.rows)
    except Exception:  # noqa: BLE001 - a wave's task failed for good: load_waves.finish says so
        return


def dataset_of_waves(parts: Sequence[Pending]) -> Any:
    """A Ray Dataset that reads each partition of each wave once it has settled."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class Waves(Datasource):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]

        def estimate_inmemory_data_size(self) -> int:
            return sum(p.size_bytes for p in parts)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            # In wave order: Ray Data starts read tasks in the order given.
            return [ReadTask(functools.partial(_read, p),
                             BlockMetadata(num_rows=None, size_bytes=p.size_bytes,
                                           input_files=None, exec_stats=None))
                    for p in parts]

    return ray.data.read_datasource(
        Waves(), num_cpus=READ_TASK_CPUS,
        concurrency=min(len(parts), READ_TASKS_IN_FLIGHT) or 1)
