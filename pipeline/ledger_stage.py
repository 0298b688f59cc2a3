"""The ledger's end of a run on the cluster: one task per address partition folds that
partition's journal into its consolidated file and returns its tally (tally.py); the driver
merges the tallies. No step reads the whole ledger in one place.
"""

from __future__ import annotations

import ray

from . import ledger, storage, tally


# Half a CPU: the send stage's actors may still hold theirs while the pool winds down, and a
# whole-CPU ask then ran the partitions one after the other.
@ray.remote(num_cpus=0.5, max_retries=3)
def _fold(run_dir: str, part: int, run_id: str, write: bool) -> tally.Tally:
    rows, journal = ledger.fold_partition(run_dir, part, write=write)
    return tally.summarise(journal, run_id=run_id, ledger=rows)


def fold(run_dir: str, *, run_id: str, write: bool = True) -> tally.Tally:
    """Fold every partition present (`write=False`: a run that lost its lease only reads,
    the run that took over owns the ledger) and return the merged tally."""
    parts = ledger.partitions_present(run_dir) or [0]  # an empty ledger is still written
    env = storage.runtime_env(run_dir)
    task = _fold.options(runtime_env=env) if env else _fold
    return tally.merge(ray.get([task.remote(run_dir, p, run_id, write) for p in parts]))
