"""The waves after the first of a load in waves (load_stage.py): their tasks, submitted once the
send stage is under way, and what the driver learns of them.

A wave's maps wait for the wave before it to settle and for the sender pool to be up (`gate`),
so the first wave has the cluster to itself until the first emails go out; its partitions'
settles take the addresses every earlier wave kept (the first row of an address wins, so a
later wave's row of it is a duplicate). A wave is sent and its settled rows written only once
it and every wave before it read cleanly (`ok`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import ray

from . import load_tasks, recipients
from .load_dataset import Pending
from .partitions import PartitionCounts, Rules

# What a later wave's map and settle tasks reserve: the senders hold a share each by then, and
# a local Ray keeps one CPU over theirs (ray_session.start).
LATER_WAVE_CPUS = 0.5


@dataclass(frozen=True, kw_only=True)
class Wave:
    """One wave, as Ray objects."""

    rows: int  # input rows
    ok: Any  # True once this wave and every one before it read cleanly
    results: list[Any]  # the MapResults of its maps
    counts: list[Any]  # PartitionCounts, per partition
    settled: list[Any]  # ledger rows settled at load, per partition
    to_send: list[Any]  # rows to send, one table per partition
    writes: list[Any] = field(default_factory=list)  # its settled rows being written


@dataclass(frozen=True, kw_only=True)
class Writer:
    """Where settled rows go (load_stage.write_settled): the ledger of this run."""

    run_dir: str
    run_id: str
    epoch: int
    options: dict[str, Any]


def submit_wave(units: Sequence[recipients.Unit], *, rules: Rules, options: dict[str, Any],
                suppression: list[pl.Series | None], resume_from: str | None,
                retry_failed: bool, keepers: list[list[Any]], before: Any = True,
                after: Sequence[Any] = ()) -> Wave:
    """One wave's tasks: its maps (waiting for the Ray objects `after`), one settle per
    partition taking the keepers of every earlier wave (`keepers`, per partition; this wave's
    are appended), and its `ok` (`before`: the wave before it read cleanly)."""
    p = rules.partitions
    maps: list[Any] = [load_tasks.map_rows.options(num_returns=p + 1, **options).remote(
        chunk, rules, False, *after) for chunk in load_tasks.chunks(units)]
    settles: list[Any] = [load_tasks.settle_wave.options(**options).remote(
        k, rules, suppression[k], resume_from, retry_failed, len(maps), *[m[k] for m in maps],
        *keepers[k]) for k in range(p)]
    for k in range(p):
        keepers[k].append(settles[k][2])
    results = [m[-1] for m in maps]
    return Wave(rows=sum(u.rows for u in units), ok=load_tasks.wave_ok.remote(before, *results),
                results=results, counts=[s[0] for s in settles],
                settled=[s[1] for s in settles], to_send=[s[3] for s in settles])


class Later:
    """The waves after the first: planned at load, submitted by `submit` (the send stage's
    Dataset, or `finish`), then followed."""

    def __init__(self, waves: Sequence[Sequence[recipients.Unit]], *, first: Wave,
                 keepers: list[list[Any]], rules: Rules, options: dict[str, Any],
                 suppression: list[pl.Series | None], resume_from: str | None,
                 retry_failed: bool) -> None:
        self._units = [list(w) for w in waves]
        self._keepers = keepers  # per partition: each submitted wave's keepers
        self._rules = rules
        self._options = options
        self._suppression = suppression
        self._resume_from = resume_from
        self._retry_failed = retry_failed
        self.first = first
        self.submitted: list[Wave] = []
        self.writer: Writer | None = None
        self._to_send: dict[int, int] = {}  # wave: rows to send, once known

    @property
    def planned(self) -> list[list[recipients.Unit]]:
        return self._units

    def submit(self, gate: Sequence[Any] = ()) -> list[Wave]:
        """Every later wave's tasks (once; later calls return them): the first of them waits
        for `gate` (Ray objects) too."""
        if self.submitted or not self._units:
            return self.submitted
        opts = {**self._options, "num_cpus": LATER_WAVE_CPUS}
        before, after = self.first, list(gate)
        for units in self._units:
            wave = submit_wave(units, rules=self._rules, options=opts,
                               suppression=self._suppression, resume_from=self._resume_from,
                               retry_failed=self._retry_failed, keepers=self._keepers,
                               before=before.ok, after=[*after, *before.counts])
            self.submitted.append(wave)
            before, after = wave, []
        if self.writer is not None:
            self._write(self.writer)
        self._keepers = []  # held by the tasks now, as long as they need them
        return self.submitted

    def write_with(self, writer: Writer) -> None:
        """Write each later wave's settled rows into the ledger as it settles."""
        self.writer = writer
        if self.submitted:
            self._write(writer)

    def _write(self, w: Writer) -> None:
        task = load_tasks.write_settled.options(**w.options)
        for n, wave in enumerate(self.submitted, start=1):
            wave.writes.extend(task.remote(w.run_dir, ref, w.run_id, w.epoch,
                                           f"load-{w.run_id}-wave{n}", wave.ok)
                               for ref in wave.settled)

    def pending(self, coordinator: Any) -> list[Pending]:
        """What the send stage's Dataset reads: every partition of every wave, the first one
        included, in wave order."""
        waves = [self.first, *self.submit()]
        return [Pending(ok=w.ok, rows=r, size_bytes=w.rows * 100 // max(1, len(w.to_send)),
                        stop=coordinator) for w in waves for r in w.to_send]

    def expected(self, first: int) -> int:
        """Rows to send: `first` (the first wave's), those of the later waves settled so far,
        and at most every input row of the others; for progress, never waits."""
        out = first
        for n, units in enumerate(self._units):
            if n not in self._to_send and n < len(self.submitted):
                wave = self.submitted[n]
                refs = [wave.ok, *wave.counts]
                if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs):
                    try:
                        sent = ray.get(wave.ok) and sum(c.to_send for c in ray.get(wave.counts))
                    except Exception:  # noqa: BLE001 - finish reports it
                        sent = 0
                    self._to_send[n] = int(sent)
            out += self._to_send.get(n, sum(u.rows for u in units))
        return out

    def finish(self, *, wait: bool, timeout: float) -> tuple[list[PartitionCounts], str | None]:
        """The counts of each later wave that settled (all of them, if `wait`), once its settled
        rows are written (up to `timeout` seconds each without `wait`), and the first wave
        that could not be loaded (None if none): its rows and those of the waves after it
        were neither sent nor recorded. Without `wait` the tasks still to run are cancelled:
        the resume settles those waves again, the same way."""
        counts: list[PartitionCounts] = []
        error = None
        waves = self.submit()
        for n, wave in enumerate(waves):
            refs = [wave.ok, *wave.counts]
            if not wait and len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
                self._cancel(waves[n:])
                break
            try:
                if not ray.get(wave.ok):
                    error = next((r.error for r in ray.get(wave.results) if r.error), None)
                    break
                counts += ray.get(wave.counts)
            except Exception as exc:  # noqa: BLE001 - a task that failed for good
                error = f"wave {n + 2} of the input could not be loaded ({_line(exc)})"
                self._cancel(waves[n:])
                break
            try:
                ray.get(wave.writes, timeout=None if wait else timeout)
            except ray.exceptions.GetTimeoutError:
                # Its rows were settled (and maybe sent): they count. Settled rows not written
                # are settled again, the same way, by the resume.
                self._cancel(waves[n:])
                break
            except Exception as exc:  # noqa: BLE001 - the ledger's storage refused, for good
                error = f"wave {n + 2}'s settled rows could not be written ({_line(exc)})"
                self._cancel(waves[n:])
                break
        return counts, error

    @staticmethod
    def _cancel(waves: Sequence[Wave]) -> None:
        for wave in waves:
            for ref in [*wave.writes, *wave.counts, *wave.results]:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - done already, or never to run
                    pass


def _line(exc: BaseException) -> str:
    """A task's failure as one short line (a RayTaskError's text ends with the cause)."""
    return (str(exc).strip().splitlines()[-1:] or [type(exc).__name__])[0][:200]
