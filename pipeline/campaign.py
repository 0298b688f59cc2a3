"""One function that runs a campaign, top to bottom as the data flows:
plan → lease → load → send → ledger → report.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any

import polars as pl

# Ray is imported only where a run needs it (send_stage.py): the CLI turns every file, column
# and flag error into one line before that, about 0.5 s sooner.
from . import ledger, recipients, report, send_stage, storage
from .config import CampaignConfig, SendConfig
from .errors import CampaignInterrupted
from .hooks import Hooks, Stages
from .lease import Lease, LeaseLost
from .plan import Plan, plan
from .templates import header_fields, with_bodies


def run_campaign(config: CampaignConfig, *,
                 hooks: Hooks | None = None) -> report.Report | report.DryRunReport:
    """Send the campaign `config` describes; return its report.

    Raises UsageError for user mistakes and for a campaign another run holds (before Ray
    starts), CampaignInterrupted after a requested stop (the ledger is flushed and the campaign
    can be resumed), and lease.LeaseLost when another run took the campaign over mid-run.
    """
    hooks = hooks or Hooks()
    stages = Stages()
    started_at = time.time()

    with stages.time("load"):
        p = plan(config, hooks=hooks)
        send_stage.prefetch_imports(config)  # flags and files are checked: import Ray while polars loads
        send = with_bodies(p.send)  # actors get the template text, not a path to read
        fields = ("name",) + tuple(sorted(header_fields(send.message) - {"name"}))
        loaded = recipients.load(p.lazy, suppression=p.suppression, header_fields=fields,
                                 source=p.input)
        if config.dry_run:  # renders only: no lease; the ledger is only read, never written
            return _dry_run(config, p, send, loaded, stages, hooks)
        # Held from before the ledger is read until the last ledger write: no second run of
        # this campaign reads a ledger this one is still adding to.
        lease = Lease.acquire(p.run_dir, run_id=p.run_id, ttl=config.lease_ttl)
    try:
        return _run(config, p, send, loaded, lease, hooks, stages, started_at)
    finally:
        lease.release()


def _run(config: CampaignConfig, p: Plan, send: SendConfig, loaded: recipients.Loaded,
         lease: Lease, hooks: Hooks, stages: Stages, started_at: float) -> report.Report:
    lost = threading.Event()
    lease.start_heartbeat(on_lost=lambda exc: lost.set())
    with stages.time("load"):
        done = None if config.restart else ledger.done_ids(p.run_dir, retry_failed=config.retry_failed)
        loaded = recipients.skip_done(loaded, done)

    if config.restart:  # only now that the input has loaded cleanly: a bad input keeps the old ledger
        ledger.reset(p.run_dir)
    storage.makedirs(p.run_dir)
    ledger.write_frame(p.run_dir, loaded.settled.with_columns(
        run=pl.lit(p.run_id), epoch=pl.lit(lease.epoch, pl.Int64)), name=f"load-{p.run_id}")
    manifest = {"campaign": p.campaign, "input": p.input, "input_rows": loaded.input_rows,
                "to_send": loaded.to_send.height, "already_done": loaded.already_done,
                "run_id": p.run_id, "started_at": started_at, "finished_at": None,
                "state": "running"}
    _write_manifest(p.run_dir, manifest)
    if loaded.already_done:
        hooks.info(f"resuming campaign {p.campaign}: {loaded.already_done:,} recipients already "
                   "done are skipped")
    hooks.info(f"{p.campaign}: sending {loaded.to_send.height:,} of {loaded.input_rows:,} rows · "
               f"{_shape(config)} · {p.run_dir}")

    outcome = None
    log_file = _log_file(p) if hooks.before_ray and not config.verbose else None
    if loaded.to_send.height:
        if log_file and hooks.before_ray:
            hooks.before_ray(log_file)
        job = send_stage.SendJob(campaign=p.campaign, run_dir=p.run_dir, run_id=p.run_id,
                      epoch=lease.epoch, send=send, fields=loaded.fields)
        outcome = send_stage.send(loaded.to_send, job, config=config, hooks=hooks, stages=stages,
                             lease=_LeaseView(lease, lost))
    lease_lost = lost.is_set() or (outcome is not None and outcome.lease_lost)

    with stages.time("ledger"):
        if lease_lost:  # the taker owns ledger.parquet now: read, never fold
            journal = ledger.read_journal(p.run_dir)
            full = ledger.latest(journal)
        else:
            full, journal = ledger.consolidate_with_journal(p.run_dir)
        this_run = journal.filter(pl.col("run") == p.run_id)

    with stages.time("report"):
        rep = report.build(
            campaign=p.campaign, run_id=p.run_id, run_dir=p.run_dir, input=p.input, send=send,
            batch_size=outcome.batch_size if outcome else 0, loaded=loaded, this_run=this_run,
            ledger=full, stages=stages.seconds, started_at=started_at,
            ray_stats=outcome.ray_stats if outcome else (),
            crashed_batches=outcome.totals.crashed if outcome else 0,
            interrupted=bool(outcome and outcome.interrupted), lease_lost=lease_lost,
            log_file=log_file if outcome else None)
        if config.charts:
            rep = report.with_charts(rep, this_run)
    # Set after the stage closes so that the report holds its own stage's time too.
    rep = report.finish(rep, stages.seconds, started_at)
    if lease_lost:
        raise LeaseLost(f"campaign {p.campaign}: another run took the campaign over (this run's "
                        "lease was lost or ran out); this run stopped sending and left the "
                        f"ledger to it (Ray's log: {rep.log_file})")
    report.write(rep)
    state = "stopped" if rep.interrupted else "finished"
    _write_manifest(p.run_dir, manifest | {"state": state, "finished_at": time.time()})
    if rep.interrupted:
        raise CampaignInterrupted(f"campaign {p.campaign} stopped before the end", report=rep)
    return rep


class _LeaseView:
    """The lease as the send stage reads it (send_stage.LeaseView)."""

    def __init__(self, lease: Lease, lost: threading.Event) -> None:
        self._lease = lease
        self._lost = lost

    @property
    def valid_until(self) -> float:
        return self._lease.valid_until

    @property
    def lost(self) -> bool:
        return self._lost.is_set()


def _dry_run(config: CampaignConfig, p: Plan, send: SendConfig, loaded: recipients.Loaded,
             stages: Stages, hooks: Hooks) -> report.DryRunReport:
    from .dryrun import write_dry_run
    done = None if config.restart else ledger.done_ids(p.run_dir, retry_failed=config.retry_failed)
    loaded = recipients.skip_done(loaded, done)
    with stages.time("render"):
        written = write_dry_run(loaded.to_send.head(config.dry_run or 0), p.run_dir, p.campaign, send)
    hooks.info(f"dry run: wrote {written} .eml files under {storage.join(p.run_dir, 'dry-run')}")
    return report.build_dry_run(campaign=p.campaign, run_dir=p.run_dir, loaded=loaded,
                                stages=stages.seconds, written=written)


def _shape(config: CampaignConfig) -> str:
    s = config.send
    what = f"{s.actors} actors × {s.concurrency} {'threads' if s.mode == 'threads' else 'async'}"
    return what + (f" · fake {s.latency} s" if s.sender == "fake" else " · SMTP")


def _log_file(p: Plan) -> str:
    """Where Ray's own console output goes: the run directory, or for a run directory in
    object storage, the local temporary directory."""
    name = f"ray-{p.run_id}.log"
    if storage.is_local(p.run_dir):
        logs = os.path.join(storage.resolve(p.run_dir)[1], "logs")
        os.makedirs(logs, exist_ok=True)
        return os.path.join(logs, name)
    return os.path.join(tempfile.gettempdir(), f"bulkmail-{p.campaign}-{name}")


def _write_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    """campaign.json: what `bulkmail status` needs besides the ledger (the totals, the state)."""
    storage.write_text(storage.join(run_dir, "campaign.json"), json.dumps(manifest, indent=2))
