"""The run's report: counts that reconcile with the input, stage times, throughput, efficiency
against the ideal, latency percentiles. Built from the merged per-partition tallies
(tally.py), never from the whole ledger; no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import storage
from .config import SendConfig
from .ledger import DUPLICATE, FAILED, INVALID, SENT, SUPPRESSED
from .partitions import LoadSummary
from .tally import Tally, latency_quantile

STAGE_ORDER = ("ray_start", "load", "partition", "send", "ledger", "ray_stop", "report", "render")


def efficiency(t: Tally, send: SendConfig) -> dict[str, Any]:
    """Throughput and efficiency from the ledger's own timestamps (first start → last end).

    ideal = attempts × latency / (actors × concurrency per actor); efficiency = ideal / measured.
    """
    first, last = t.first_start, t.last_end
    attempts = t.started_attempts
    if first is None or last is None or last <= first:
        return {"window_s": 0.0, "emails_per_s": 0.0, "ideal_s": 0.0, "efficiency": None,
                "attempts": attempts, "ideal_emails_per_s": None}
    window = last - first
    ideal = attempts * send.latency / send.total_concurrency if send.sender == "fake" else None
    return {
        "window_s": round(window, 3),
        "emails_per_s": round(t.started / window, 1),
        "attempts": attempts,
        "ideal_s": None if ideal is None else round(ideal, 3),
        "efficiency": None if ideal is None else round(ideal / window, 4),
        "ideal_emails_per_s": round(send.total_concurrency / send.latency, 1)
        if send.latency else None,
    }


def latency(t: Tally) -> dict[str, float | None]:
    """Percentiles from the merged histogram (within 1%), never above the exact maximum."""
    if not t.latency or t.latency_max is None:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        value = latency_quantile(t.latency, q / 100)
        out[f"p{q}"] = None if value is None else round(min(value, t.latency_max), 4)
    out["max"] = round(t.latency_max, 4)
    return out


@dataclass(frozen=True, kw_only=True)
class Settings:
    mode: str
    sender: str
    actors: int
    concurrency_per_actor: int
    total_concurrency: int
    latency_s: float
    max_attempts: int
    batch_size: int
    rate: float | None


@dataclass(frozen=True, kw_only=True)
class Counts:
    """This run's outcomes; `reconciled`: every input row is accounted for exactly once."""

    input_rows: int
    already_done: int
    sent: int
    failed: int
    invalid: int
    duplicate: int
    suppressed: int
    not_sent: int
    reconciled: bool


@dataclass(frozen=True, kw_only=True)
class SendStats:
    window_s: float
    emails_per_s: float
    attempts: int
    ideal_s: float | None
    efficiency: float | None
    ideal_emails_per_s: float | None
    retries: int
    repeated_records: int
    crashed_batches: int


@dataclass(frozen=True, kw_only=True)
class Latency:
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True, kw_only=True)
class Report:
    """One run's report, built once at its end; JSON and Markdown are renderings of it."""

    campaign: str
    run_id: str
    run_dir: str
    input: str
    started_at: str
    interrupted: bool
    lease_lost: bool
    config: Settings
    counts: Counts
    campaign_counts: Mapping[str, int]
    stages_s: Mapping[str, float]
    total_s: float
    # Seconds after the run's start. Of a load in waves the later waves load while the first
    # sends (inside the send stage), so the load stage alone does not say when the list was in.
    first_email_after_s: float | None
    list_loaded_after_s: float | None  # None: a stopped run left waves unloaded
    waves: int
    send: SendStats
    latency_s: Latency
    ray_data: tuple[Mapping[str, Any], ...]
    log_file: str | None = None
    charts: tuple[str, ...] = ()
    chart_errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.chart_errors:
            del out["chart_errors"]
        return out


@dataclass(frozen=True, kw_only=True)
class DryRunReport:
    campaign: str
    run_dir: str
    dry_run: int  # .eml files written
    counts: Mapping[str, int]
    stages_s: Mapping[str, float]


def build(*, campaign: str, run_id: str, run_dir: str, input: str, send: SendConfig,
          batch_size: int, loaded: LoadSummary, tally: Tally,
          stages: Mapping[str, float], ray_stats: tuple[Mapping[str, Any], ...],
          crashed_batches: int, started_at: float, interrupted: bool, lease_lost: bool = False,
          log_file: str | None = None) -> Report:
    run_counts = {s: int(tally.run.get(s, 0)) for s in (SENT, FAILED, INVALID, DUPLICATE, SUPPRESSED)}
    not_sent = loaded.to_send - run_counts[SENT] - run_counts[FAILED]
    accounted = (sum(run_counts.values()) + loaded.already_done + not_sent)
    return Report(
        campaign=campaign, run_id=run_id, run_dir=run_dir, input=input,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        interrupted=interrupted, lease_lost=lease_lost, log_file=log_file,
        config=Settings(
            mode=send.mode, sender=send.sender, actors=send.actors,
            concurrency_per_actor=send.concurrency, total_concurrency=send.total_concurrency,
            latency_s=send.latency, max_attempts=send.retry.max_attempts,
            batch_size=batch_size, rate=send.rate),
        counts=Counts(input_rows=loaded.input_rows, already_done=loaded.already_done,
                      **run_counts, not_sent=not_sent,
                      reconciled=accounted == loaded.input_rows),
        campaign_counts=dict(tally.campaign),
        stages_s={k: round(stages[k], 3) for k in STAGE_ORDER if k in stages},
        total_s=round(time.time() - started_at, 3),
        first_email_after_s=_after(tally.first_start, started_at),
        list_loaded_after_s=_after(loaded.loaded_at, started_at), waves=loaded.waves,
        send=SendStats(**efficiency(tally, send), retries=tally.attempts - tally.tried,
                       repeated_records=tally.repeated, crashed_batches=crashed_batches),
        latency_s=Latency(**latency(tally)),
        ray_data=ray_stats,
    )


def _after(t: float | None, started_at: float) -> float | None:
    return None if t is None else round(max(0.0, t - started_at), 3)


def build_dry_run(*, campaign: str, run_dir: str, loaded: LoadSummary, stages: Mapping[str, float],
                  written: int) -> DryRunReport:
    return DryRunReport(campaign=campaign, run_dir=run_dir, dry_run=written,
                        counts={"input_rows": loaded.input_rows,
                                "already_done": loaded.already_done, **loaded.counts},
                        stages_s={k: round(v, 3) for k, v in stages.items()})


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def summary_rows(rep: Report) -> list[tuple[str, str]]:
    """The summary as (label, value) rows, shared by the terminal table and report.md."""
    c, s, lat, cfg = rep.counts, rep.send, rep.latency_s, rep.config
    rows = [
        ("campaign", rep.campaign),
        ("mode", f"{cfg.mode} · {cfg.actors} actors × {cfg.concurrency_per_actor} "
                 f"= {cfg.total_concurrency} concurrent · sender {cfg.sender}"
                 + (f" · latency {cfg.latency_s} s" if cfg.sender == "fake" else "")),
        ("input rows", _fmt(c.input_rows)),
        ("already done (resume)", _fmt(c.already_done)),
        ("sent", _fmt(c.sent)), ("failed", _fmt(c.failed)), ("invalid", _fmt(c.invalid)),
        ("duplicate", _fmt(c.duplicate)), ("suppressed", _fmt(c.suppressed)),
        ("not sent (stopped)", _fmt(c.not_sent)),
        ("reconciled", "yes" if c.reconciled else "NO"),
    ]
    rows += [(f"stage {k} (s)", _fmt(v)) for k, v in rep.stages_s.items()]
    rows += [
        ("total wall (s)", _fmt(rep.total_s)),
        ("first email after (s)", _fmt(rep.first_email_after_s)),
        ("list loaded after (s)", _fmt(rep.list_loaded_after_s)
         + (f" (in {rep.waves} waves)" if rep.waves > 1 else "")),
        ("send window (s)", _fmt(s.window_s)),
        ("emails/s", _fmt(s.emails_per_s)),
        ("efficiency vs ideal", "–" if s.efficiency is None else f"{s.efficiency:.3f}"),
        ("retries", _fmt(s.retries)),
        ("latency p50/p95/p99 (s)", f"{_fmt(lat.p50)} / {_fmt(lat.p95)} / {_fmt(lat.p99)}"),
    ]
    return rows


def to_markdown(rep: Report) -> str:
    lines = [f"# bulkmail report: {rep.campaign}", "", f"Run `{rep.run_id}` started "
             f"{rep.started_at}; input `{rep.input}`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(rep)]
    if rep.ray_data:
        lines += ["", "## Ray Data operators", "",
                  "| operator | operator time (s) | task wall, sum (s) | task CPU, sum (s) | rows |",
                  "|---|---|---|---|---|"]
        for op in rep.ray_data:
            wall = op.get("wall_time", {}).get("sum")
            cpu = op.get("cpu_time", {}).get("sum")
            rows = op.get("output_num_rows", {}).get("sum")
            lines.append(f"| {op['operator']} | {_fmt(op.get('time_total_s'))} | {_fmt(wall)} | "
                         f"{_fmt(cpu)} | {_fmt(rows)} |")
    for chart in rep.charts:
        lines += ["", f"![{chart}]({chart})"]
    return "\n".join(lines) + "\n"


def finish(rep: Report, stages: Mapping[str, float], started_at: float) -> Report:
    """`rep` with the final stage times (the report stage's own included) and total wall."""
    return dataclasses.replace(
        rep, stages_s={k: round(stages[k], 3) for k in STAGE_ORDER if k in stages},
        total_s=round(time.time() - started_at, 3))


def with_charts(rep: Report, tally: Tally, *, of_tally: bool = True,
                of_stages: bool = True) -> Report:
    """`rep` with its PNG charts drawn beside report.md (names relative to the run directory),
    the tally's and the stages' or one of them, added to those it has; a chart that fails is
    listed in `chart_errors`, never raised."""
    from .charts import write_charts as draw
    names, errors = draw(rep.to_json(), tally, rep.run_dir, of_tally=of_tally,
                         of_stages=of_stages)
    return dataclasses.replace(rep, charts=rep.charts + tuple(names),
                               chart_errors=rep.chart_errors + tuple(errors))


def write(rep: Report) -> None:
    storage.write_text(storage.join(rep.run_dir, "report.json"),
                       json.dumps(rep.to_json(), indent=2, default=str))
    storage.write_text(storage.join(rep.run_dir, "report.md"), to_markdown(rep))
