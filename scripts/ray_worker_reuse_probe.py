"""Does Ray hand a worker process that has run tasks to an actor? (It does not, in 2.60.)

    python scripts/ray_worker_reuse_probe.py

Runs four tasks on a fresh local Ray (2 logical CPUs), then starts two plain actors and a Ray
Data actor pool, and prints the process ids each ran in. The actors' ids are never among the
tasks': an actor always gets a process of its own, started for it. This is why the send stage's
actors start fresh processes after the load's tasks (README, "1,000,000 recipients").
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import ray


@ray.remote
def _task() -> int:
    time.sleep(0.3)  # long enough that the four tasks share the two workers Ray starts with
    return os.getpid()


@ray.remote(num_cpus=0.25)
class _Actor:
    def pid(self) -> int:
        return os.getpid()


class _Udf:
    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"pid": [os.getpid()] * batch.num_rows})


def main() -> int:
    ray.init(num_cpus=2, logging_level=logging.ERROR, include_dashboard=False,
             _system_config={"idle_worker_killing_time_threshold_ms": 60_000})
    ray.data.DataContext.get_current().enable_progress_bars = False
    tasks = set(ray.get([_task.remote() for _ in range(4)]))
    actors = [_Actor.remote() for _ in range(2)]  # type: ignore[attr-defined]
    plain = {ray.get(a.pid.remote()) for a in actors}
    ds = ray.data.range(100, override_num_blocks=4).map_batches(
        _Udf, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.25)
    pool = {row["pid"] for row in ds.take_all()}
    ray.shutdown()
    print(f"task workers:      {sorted(tasks)}")
    print(f"plain actors:      {sorted(plain)}")
    print(f"Ray Data actors:   {sorted(pool)}")
    reused = tasks & (plain | pool)
    print("an actor reused a task's worker" if reused else
          "no actor ran in a process that had run a task")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
