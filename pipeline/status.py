"""`bulkmail status`: how a campaign is doing, from its run directory alone (local or `s3://…`):
the ledger (read by ledger_scan.py, lazily), `campaign.json` and the lease. A status of a few
million ledger rows takes well under a second locally (tests/test_status.py prints the time).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass

import polars as pl

from . import ledger, ledger_scan, storage
from .errors import UsageError
from .ledger_scan import resolve_run_dir

__all__ = ["Status", "campaign_status", "resolve_run_dir"]

UNKNOWN = "unknown"
RATE_WINDOW_S = 60.0
TOP_FAILURES = 5
NO_ERROR_TEXT = "(no error text)"
LINE_WIDTH = 100


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _epoch(value: object) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return None


# --------------------------------------------------------------------------- campaign.json


def _read_campaign_file(run_dir: str) -> dict[str, object] | None:
    path = storage.join(run_dir, ledger_scan.CAMPAIGN_FILE)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def _get_int(info: dict[str, object], key: str) -> int | None:
    value = info.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _get_float(info: dict[str, object], key: str) -> float | None:
    value = info.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _get_str(info: dict[str, object], key: str) -> str | None:
    value = info.get(key)
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, kw_only=True)
class Status:
    """Where a campaign stands, from its ledger, `campaign.json` and lease."""

    campaign: str
    run_dir: str
    state: str  # running | finished | stopped | failed (campaign.json), or unknown
    total: int  # recipients in the input (campaign.json), or ids in the ledger without it
    done: int  # recipients with a final status (sent, failed, invalid, duplicate, suppressed)
    counts: dict[str, int]  # per status, latest row per id
    rate_per_s_last_minute: float | None  # sent + failed per second (None unless running)
    eta_s: float | None  # only while running at a rate above zero
    top_failures: tuple[tuple[str, int], ...]  # error text -> recipients, most frequent first
    holder: str | None  # the lease holder, as Holder.describe() puts it
    holder_active: bool
    last_activity: float | None  # the latest finished_at (epoch seconds)
    run_id: str | None

    @property
    def remaining(self) -> int:
        return max(self.total - self.done, 0)

    def to_json(self) -> dict[str, object]:
        return {
            "campaign": self.campaign,
            "run_dir": self.run_dir,
            "state": self.state,
            "run_id": self.run_id,
            "total": self.total,
            "done": self.done,
            "remaining": self.remaining,
            "counts": dict(self.counts),
            "rate_per_s_last_minute": self.rate_per_s_last_minute,
            "eta_s": self.eta_s,
            "top_failures": [{"error": e, "count": n} for e, n in self.top_failures],
            "holder": self.holder,
            "holder_active": self.holder_active,
            "last_activity": self.last_activity,
        }

    def lines(self, *, now: float | None = None) -> list[str]:
        """A short human rendering, every line at most 100 characters."""
        now = time.time() if now is None else now
        run = f", run {self.run_id}" if self.run_id else ""
        out = [f"campaign {self.campaign}: {self.state}{run}", f"  run dir: {self.run_dir}"]
        pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        out.append(f"  done: {self.done:,} of {self.total:,}{pct}, {self.remaining:,} to go")
        shown = [f"{s} {n:,}" for s, n in self.counts.items() if n or s in (ledger.SENT, ledger.FAILED)]
        out.append("  " + ", ".join(shown))
        if self.rate_per_s_last_minute is not None:
            eta = f", ETA {_duration(self.eta_s)}" if self.eta_s is not None else ""
            out.append(f"  rate: {self.rate_per_s_last_minute:,.1f}/s over the last minute{eta}")
        if self.last_activity is not None:
            when = _utc(self.last_activity).strftime("%Y-%m-%d %H:%M:%S UTC")
            out.append(f"  last activity: {when} ({_duration(max(now - self.last_activity, 0))} ago)")
        if self.holder is not None:
            out.append(f"  lease: {self.holder}" + ("" if self.holder_active else " (not active)"))
        if self.state == "running" and not self.holder_active:
            out.append("  campaign.json says running but no live run holds the lease: did it crash?")
        if self.top_failures:
            out.append("  top failures:")
            out.extend(f"    {n:>9,}  {' '.join(e.split())}" for e, n in self.top_failures)
        return [_fit(line) for line in out]


def _fit(line: str, width: int = LINE_WIDTH) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _holder(run_dir: str, now: float) -> tuple[str | None, bool]:
    from .lease import read_holder
    holder = read_holder(run_dir)
    if holder is None:
        return None, False
    # Released, or past its ttl since the last heartbeat: nobody is sending under it.
    active = not holder.released and holder.expires_in(now) >= 0
    return holder.describe(now), active


@dataclass(frozen=True, kw_only=True)
class _Figures:
    counts: dict[str, int]
    failures: tuple[tuple[str, int], ...]
    this_run_settled: int
    last_activity: float | None
    in_window: int


def _figures(journal: pl.LazyFrame, *, run_id: str | None, window: tuple[float, float]) -> _Figures:
    """Every figure of a status in one pass of polars over the journal (shared by the queries)."""
    latest = ledger_scan.latest(journal, ("id", "status", "error", "run"))
    counts_q = latest.group_by("status").agg(pl.len().alias("n"))
    failures_q = (latest.filter(pl.col("status") == ledger.FAILED)
                  .group_by(pl.col("error").fill_null(NO_ERROR_TEXT)).agg(pl.len().alias("n"))
                  .sort(["n", "error"], descending=[True, False]).head(TOP_FAILURES))
    tried = pl.col("status").is_in([ledger.SENT, ledger.FAILED])
    this_run_q = latest.filter(tried & (pl.col("run") == (run_id or ""))).select(pl.len().alias("n"))
    lo, hi = _utc(window[0]), _utc(window[1])
    in_window = (tried & (pl.col("finished_at") > lo) & (pl.col("finished_at") <= hi)).sum()
    journal_q = journal.select(last=pl.col("finished_at").max(), in_window=in_window)
    counts, failures, this_run, journal_row = pl.collect_all([counts_q, failures_q, this_run_q, journal_q])
    return _Figures(
        counts={str(s): int(n) for s, n in counts.iter_rows()},
        failures=tuple((str(e), int(n)) for e, n in failures.iter_rows()),
        this_run_settled=int(this_run.item()),
        last_activity=_epoch(journal_row["last"][0]),
        in_window=int(journal_row["in_window"][0] or 0),
    )


def campaign_status(run_dir: str, *, now: float | None = None) -> Status:
    """The status of the campaign in `run_dir` (running, finished, stopped half-way, …)."""
    now = time.time() if now is None else now
    ledger_scan.require_run_dir(run_dir)
    info = _read_campaign_file(run_dir)
    state = UNKNOWN
    run_id = started_at = to_send = input_rows = None
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    if info is not None:
        state = _get_str(info, "state") or UNKNOWN
        run_id = _get_str(info, "run_id")
        started_at = _get_float(info, "started_at")
        to_send = _get_int(info, "to_send")
        input_rows = _get_int(info, "input_rows")
        name = _get_str(info, "campaign") or name

    # The rate window ends now and spans the last minute, or the run so far if it is younger.
    span = RATE_WINDOW_S
    if started_at is not None and 0 <= now - started_at < RATE_WINDOW_S:
        span = max(now - started_at, 1.0)
    window = (now - span, now)
    figures = ledger_scan.read(run_dir, lambda journal: _figures(journal, run_id=run_id, window=window))

    counts = {s: 0 for s in ledger.FINAL_STATUSES}
    for s, n in sorted(figures.counts.items()):
        counts[s] = counts.get(s, 0) + n
    done = sum(counts[s] for s in ledger.FINAL_STATUSES)
    ids = sum(counts.values())
    total = ids if input_rows is None else max(input_rows, ids)

    # A rate only for a live campaign: running, or (no campaign.json) active within the window.
    live = state == "running" or (state == UNKNOWN and figures.last_activity is not None
                                  and figures.last_activity > window[0])
    rate = figures.in_window / span if live else None
    eta = None
    if state == "running" and rate:
        remaining = total - done
        if to_send is not None and run_id is not None:
            # `--retry-failed` resends recipients already counted done (failed is final).
            remaining = max(remaining, to_send - figures.this_run_settled)
        eta = max(remaining, 0) / rate

    holder, holder_active = _holder(run_dir, now)
    return Status(campaign=name, run_dir=run_dir, state=state, total=total, done=done,
                  counts=counts, rate_per_s_last_minute=rate, eta_s=eta,
                  top_failures=figures.failures, holder=holder, holder_active=holder_active,
                  last_activity=figures.last_activity, run_id=run_id)


