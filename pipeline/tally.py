"""What the report needs from the ledger, as mergeable aggregates: one `Tally` per partition,
computed where the partition is folded, merged on the driver. Their size depends on the run's
length in seconds and on the latency buckets, never on the number of recipients.

Latency percentiles come from a histogram of logarithmic buckets 1% wide (so a percentile is
within 1% of the exact one); the charts' series are counts per second (throughput) and per
1/20 s (sends started and finished, whose running difference is the number in flight).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import polars as pl

from .ledger import DUPLICATE, FAILED, INVALID, SENT, SUPPRESSED, latest

STATUSES = (SENT, FAILED, INVALID, DUPLICATE, SUPPRESSED)
LATENCY_GROWTH = 1.01  # each latency bucket is 1% wider than the one below
LATENCY_FLOOR = 1e-6  # seconds; anything faster counts as this
EVENT_STEP = 0.05  # seconds per bucket of the started / finished series


def _empty() -> dict[str, int]:
    return {s: 0 for s in STATUSES}


@dataclass(frozen=True, kw_only=True)
class Tally:
    campaign: Mapping[str, int] = field(default_factory=_empty)  # the ledger as it stands
    run: Mapping[str, int] = field(default_factory=_empty)  # this run's latest outcomes
    repeated: int = 0  # this run's `sent` rows beyond one per recipient
    tried: int = 0  # this run's recipients sent or failed
    attempts: int = 0  # their attempts
    started: int = 0  # of them, those with a start time (sent through an engine)
    started_attempts: int = 0
    first_start: float | None = None  # epoch seconds
    last_end: float | None = None
    latency: Mapping[int, int] = field(default_factory=dict)  # log bucket -> count
    latency_max: float | None = None
    per_second: Mapping[int, tuple[int, int]] = field(default_factory=dict)  # s -> sent, failed
    starts: Mapping[int, int] = field(default_factory=dict)  # EVENT_STEP bucket -> count
    ends: Mapping[int, int] = field(default_factory=dict)


def _epoch(col: str) -> pl.Expr:
    return pl.col(col).dt.epoch("us").cast(pl.Float64) / 1e6


def _counts(frame: pl.DataFrame, key: pl.Expr) -> dict[int, int]:
    if frame.height == 0:
        return {}
    out = frame.select(key.alias("k")).group_by("k").len()
    return {int(k): int(n) for k, n in out.iter_rows()}


def summarise(journal: pl.DataFrame, *, run_id: str, ledger: pl.DataFrame | None = None) -> Tally:
    """The tally of one partition: `journal` (every row of it, repeats included), `ledger`
    (one row per recipient, `latest(journal)` when not given)."""
    ledger = latest(journal) if ledger is None else ledger
    this_run = journal.filter(pl.col("run") == run_id)
    # This run's latest row per id is, as a rule, the ledger's row for it (this run is the
    # newest): taken from the ledger when that accounts for every id this run recorded, which
    # saves a second sort of the partition; sorted again only when it does not.
    run_latest = ledger.filter(pl.col("run") == run_id)
    if run_latest.height != this_run["id"].n_unique():
        run_latest = latest(this_run)
    tried = run_latest.filter(pl.col("status").is_in([SENT, FAILED]))
    started = tried.filter(pl.col("started_at").is_not_null())
    lat = tried.filter(pl.col("latency_s").is_not_null())
    log_bucket = (pl.col("latency_s").clip(lower_bound=LATENCY_FLOOR).log()
                  / math.log(LATENCY_GROWTH)).floor().cast(pl.Int64)
    # The charts count every recorded send of this run (repeats too: they were sent). A
    # retried recipient's last attempt ran (finished_at - latency_s, finished_at).
    rec = this_run.filter(pl.col("finished_at").is_not_null() & pl.col("started_at").is_not_null())
    end = _epoch("finished_at")
    start = (pl.when((pl.col("attempts") > 1) & pl.col("latency_s").is_not_null())
             .then(end - pl.col("latency_s")).otherwise(_epoch("started_at")))
    per_second: dict[int, tuple[int, int]] = {}
    if rec.height:
        grouped = (rec.select(end.floor().cast(pl.Int64).alias("s"),
                              (pl.col("status") == SENT).alias("ok"))
                   .group_by("s").agg(pl.col("ok").sum().alias("sent"), pl.len().alias("n")))
        per_second = {int(s): (int(ok), int(n - ok)) for s, ok, n in grouped.iter_rows()}
    return Tally(
        campaign=_status_counts(ledger), run=_status_counts(run_latest),
        repeated=this_run.filter(pl.col("status") == SENT).height
        - run_latest.filter(pl.col("status") == SENT).height,
        tried=tried.height, attempts=int(tried["attempts"].sum() or 0),
        started=started.height, started_attempts=int(started["attempts"].sum() or 0),
        first_start=float(started.select(_epoch("started_at").min()).item())
        if started.height else None,
        last_end=float(started.select(_epoch("finished_at").max()).item())
        if started.height else None,
        latency=_counts(lat, log_bucket),
        latency_max=float(lat["latency_s"].max()) if lat.height else None,  # type: ignore[arg-type]
        per_second=per_second,
        starts=_counts(rec, (start / EVENT_STEP).floor().cast(pl.Int64)),
        ends=_counts(rec, (end / EVENT_STEP).floor().cast(pl.Int64)),
    )


def _status_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = _empty()
    for status, n in frame.group_by("status").len().iter_rows():
        counts[str(status)] = int(n)
    return counts


def _add(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    out = Counter(a)
    out.update(b)
    return dict(out)


def _opt(f: object, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return f(a, b)  # type: ignore[operator, no-any-return]


def merge(tallies: Iterable[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        per_second = dict(out.per_second)
        for s, (ok, bad) in t.per_second.items():
            o = per_second.get(s, (0, 0))
            per_second[s] = (o[0] + ok, o[1] + bad)
        out = Tally(
            campaign=_add(out.campaign, t.campaign), run=_add(out.run, t.run),  # type: ignore[arg-type]
            repeated=out.repeated + t.repeated, tried=out.tried + t.tried,
            attempts=out.attempts + t.attempts, started=out.started + t.started,
            started_attempts=out.started_attempts + t.started_attempts,
            first_start=_opt(min, out.first_start, t.first_start),
            last_end=_opt(max, out.last_end, t.last_end),
            latency=_add(out.latency, t.latency),
            latency_max=_opt(max, out.latency_max, t.latency_max),
            per_second=per_second, starts=_add(out.starts, t.starts), ends=_add(out.ends, t.ends))
    return out


def latency_quantile(latency: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of the latency histogram: the geometric middle of its bucket."""
    total = sum(latency.values())
    if total == 0:
        return None
    rank = q * (total - 1)
    seen = 0
    for bucket in sorted(latency):
        seen += latency[bucket]
        if seen > rank:
            return float(LATENCY_GROWTH ** (bucket + 0.5))
    return float(LATENCY_GROWTH ** (max(latency) + 0.5))
