"""One function that runs a campaign, top to bottom as the data flows:
plan → lease → Ray → load (on the cluster) → send → ledger (folded per partition) → report
(built while Ray stops).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Ray is imported only where a run needs it (the *_stage modules, ray_session): the CLI turns
# every flag, file and column error into one line before that, about 0.5 s sooner.
from . import batching, ledger, partitions, ray_session, recipients, report, send_stage, storage
from .config import CampaignConfig, SendConfig
from .errors import CampaignInterrupted, UsageError
from .hooks import Hooks, Stages
from .lease import Lease, LeaseLost
from .plan import Plan, plan
from .tally import Tally
from .templates import header_fields, with_bodies


def run_campaign(config: CampaignConfig, *,
                 hooks: Hooks | None = None) -> report.Report | report.DryRunReport:
    """Send the campaign `config` describes; return its report.

    Raises UsageError for user mistakes and for a campaign another run holds (flags, files,
    columns and the lease before Ray starts; unreadable data pages and unusable ids once the
    load's tasks have read every row, before anything is written or sent),
    CampaignInterrupted after a requested stop (the ledger is flushed and the campaign can be
    resumed), and lease.LeaseLost when another run took the campaign over mid-run.
    """
    hooks = hooks or Hooks()
    stages = Stages()
    started_at = time.time()

    with stages.time("plan"):
        p = plan(config, hooks=hooks)
        ray_session.check_address(config)
        send = with_bodies(p.send)  # actors get the template text, not a path to read
        fields = ("name",) + tuple(sorted(header_fields(send.message) - {"name"}))
        units = recipients.units(p.input)
        rules = partitions.Rules(schema=partitions.user_schema(p.lazy.collect_schema()),
                                 header_fields=fields,
                                 partitions=_partitions(config, p, sum(u.rows for u in units)))
    if config.dry_run:  # renders only: no lease; the ledger is only read, never written
        with send_stage.prefetching(config):
            return _dry_run(config, p, send, units, rules, stages, hooks)
    # Held from before the ledger is read until the last ledger write: no second run of this
    # campaign reads a ledger this one is still adding to. Taken before Ray starts, so a
    # campaign already running is one line and exit 2 within a second.
    fresh = not storage.exists(p.run_dir)
    lease = Lease.acquire(p.run_dir, run_id=p.run_id, ttl=config.lease_ttl)
    discard = False
    try:
        with send_stage.prefetching(config):
            return _run(config, p, send, units, rules, lease, hooks, stages, started_at)
    except UsageError:
        # Found by the load's tasks (a broken data page, repeated ids): nothing was sent or
        # recorded. A campaign this run created leaves nothing behind (its lease, Ray's log).
        # A later wave's unreadable file (load_stage.finish) is found once the waves before it
        # were sent: the campaign stays, stopped, to be resumed once the file is fixed.
        discard = fresh and not storage.exists(storage.join(p.run_dir, "campaign.json"))
        raise
    finally:
        lease.release()
        if discard:
            storage.delete_dir(p.run_dir)


def _run(config: CampaignConfig, p: Plan, send: SendConfig, units: list[recipients.Unit],
         rules: partitions.Rules, lease: Lease, hooks: Hooks, stages: Stages,
         started_at: float) -> report.Report:
    lost = threading.Event()
    lease.start_heartbeat(on_lost=lambda exc: lost.set())
    log_file = (ray_session.log_file(p.run_dir, p.campaign, p.run_id)
                if hooks.before_ray and not config.verbose else None)
    if log_file and hooks.before_ray:
        hooks.before_ray(log_file)
    from . import ledger_stage, load_stage
    # Ray's stop mostly waits for its processes to exit with the CPU idle (1.1 of its 1.4 s on
    # 2 cores, docs/ray-notes.md): the report and the tally's charts are built meanwhile, and
    # the report stage is the time that adds once Ray has stopped (so stages add up to total).
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report")  # no thread yet
    with _ray(config, send, hooks, stages):
        with stages.time("load"):
            loaded = load_stage.load(units, rules=rules, source=p.input, suppression=p.suppression,
                                     resume_from=None if config.restart else p.run_dir,
                                     retry_failed=config.retry_failed,
                                     # Sized from the input's rows (the rows to send are known
                                     # only once the load has run): one block, one batch.
                                     block_rows=batching.batch_size_for(
                                         send, sum(u.rows for u in units)),
                                     wave_rows=config.wave_rows,
                                     reserved_cpus=send.actors * send.cpus_per_actor)
            if config.restart:  # only now that the input has loaded cleanly
                ledger.reset(p.run_dir)
            storage.makedirs(p.run_dir)
            load_stage.write_settled(loaded, run_dir=p.run_dir, run_id=p.run_id, epoch=lease.epoch)
        summary = loaded.summary
        send = batching.pool_for(send, loaded.batches)  # no more actors than batches
        # Of a load in waves: the whole input, and at most every row of the waves still loading.
        manifest = {"campaign": p.campaign, "input": p.input, "input_rows": loaded.input_rows,
                    "to_send": loaded.expected(), "already_done": summary.already_done,
                    "partitions": rules.partitions, "run_id": p.run_id,
                    "started_at": started_at, "finished_at": None, "state": "running"}
        _write_manifest(p.run_dir, manifest)
        waves = (f" (first wave of {loaded.wave_count}; {loaded.input_rows:,} rows in all)"
                 if loaded.later else "")
        if summary.already_done:  # of a load in waves, the first wave's: the report has all
            hooks.info(f"resuming campaign {p.campaign}: {summary.already_done:,} recipients "
                       f"already done are skipped{' in the first wave' if waves else ''}")
        hooks.info(f"{p.campaign}: sending {summary.to_send:,} of {summary.input_rows:,} rows"
                   f"{waves} · {_shape(send, config.send.actors)} · {storage.shown(p.run_dir)}")
        outcome = None
        if loaded.may_send:
            job = send_stage.SendJob(campaign=p.campaign, run_dir=p.run_dir, run_id=p.run_id,
                                     epoch=lease.epoch, send=send, fields=summary.fields)
            outcome = send_stage.send(loaded, job, config=config, hooks=hooks, stages=stages,
                                      lease=_LeaseView(lease, lost))
        lease_lost = lost.is_set() or (outcome is not None and outcome.lease_lost)
        # Of a load in waves, the later waves' counts (and their settled rows, written).
        summary, broken = load_stage.finish(
            loaded, wait=not (lease_lost or (outcome and outcome.interrupted)))
        manifest |= {"to_send": summary.to_send, "already_done": summary.already_done}
        with stages.time("ledger"):
            # A run that lost its lease reads, never folds: the taker owns the ledger now.
            totals = ledger_stage.fold(p.run_dir, run_id=p.run_id, write=not lease_lost)
        building = background.submit(
            _report, config=config, p=p, send=send, outcome=outcome, summary=summary,
            totals=totals, stages=stages, started_at=started_at, lease_lost=lease_lost,
            log_file=log_file)
    with stages.time("report"):
        rep = building.result()
    background.shutdown()
    rep = report.finish(rep, stages.seconds, started_at)
    if config.charts and not lease_lost:  # drawn once Ray has stopped: it shows every stage
        rep = report.with_charts(rep, totals, of_tally=False)
    if lease_lost:
        raise LeaseLost(f"campaign {p.campaign}: another run took the campaign over (this run's "
                        "lease was lost or ran out); this run stopped sending and left the "
                        f"ledger to it (Ray's log: {rep.log_file})")
    report.write(rep)
    state = "stopped" if rep.interrupted or broken else "finished"
    _write_manifest(p.run_dir, manifest | {"state": state, "finished_at": time.time()})
    if broken and not rep.interrupted:
        raise UsageError(f"{broken}; the rows before it were sent and recorded: fix the file and "
                         "run the campaign again to send the rest")
    if rep.interrupted:
        raise CampaignInterrupted(f"campaign {p.campaign} stopped before the end", report=rep)
    return rep


def _report(*, config: CampaignConfig, p: Plan, send: SendConfig,
            outcome: send_stage.SendOutcome | None, summary: partitions.LoadSummary,
            totals: Tally, stages: Stages, started_at: float, lease_lost: bool,
            log_file: str | None) -> report.Report:
    """The run's report and the charts drawn from its tally (runs beside Ray's stop). A run
    that lost its lease draws none: the run directory is the taker's now."""
    rep = report.build(
        campaign=p.campaign, run_id=p.run_id, run_dir=p.run_dir, input=p.input, send=send,
        batch_size=outcome.batch_size if outcome else 0, loaded=summary, tally=totals,
        stages=stages.seconds, started_at=started_at,
        ray_stats=outcome.ray_stats if outcome else (),
        crashed_batches=outcome.totals.crashed if outcome else 0,
        interrupted=bool(outcome and outcome.interrupted), lease_lost=lease_lost,
        log_file=log_file)
    if config.charts and not lease_lost:
        rep = report.with_charts(rep, totals, of_stages=False)
    return rep


@contextlib.contextmanager
def _ray(config: CampaignConfig, send: SendConfig, hooks: Hooks, stages: Stages) -> Iterator[None]:
    """Ray for the run: started (or joined) before the load, stopped after the ledger's fold."""
    with stages.time("ray_start"):
        session = ray_session.start(config, send, verbose=config.verbose)
    access = ray_session.dashboard_access(session)
    if access:
        hooks.info(access)
    try:
        yield
    finally:
        with stages.time("ray_stop"):
            session.stop()


def _partitions(config: CampaignConfig, p: Plan, rows: int) -> int:
    """The campaign's number of address partitions: kept from its first run (the ledger is
    laid out by them), chosen from the input's size for a new campaign or a restart."""
    path = storage.join(p.run_dir, "campaign.json")
    if not config.restart and storage.exists(path):
        try:
            kept = json.loads(storage.read_text(path)).get("partitions")
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, int) and kept > 0:
            return kept
    return partitions.partitions_for(rows)


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


def _dry_run(config: CampaignConfig, p: Plan, send: SendConfig, units: list[recipients.Unit],
             rules: partitions.Rules, stages: Stages, hooks: Hooks) -> report.DryRunReport:
    from . import load_stage
    from .dryrun import write_dry_run
    with _ray(config, send, hooks, stages), stages.time("load"):
        loaded = load_stage.load(units, rules=rules, source=p.input, suppression=p.suppression,
                                 resume_from=None if config.restart else p.run_dir,
                                 retry_failed=config.retry_failed,
                                 block_rows=partitions.ROWS_PER_PARTITION)  # one block a partition
        head = load_stage.take(loaded, config.dry_run or 0)
    with stages.time("render"):
        written = write_dry_run(head, p.run_dir, p.campaign, send)
    where = storage.shown(storage.join(p.run_dir, "dry-run"))
    hooks.info(f"dry run: wrote {written} .eml files under {where}")
    return report.build_dry_run(campaign=p.campaign, run_dir=p.run_dir, loaded=loaded.summary,
                                stages=stages.seconds, written=written)


def _shape(s: SendConfig, asked: int) -> str:
    fewer = f" (as many as batches; --actors {asked})" if s.actors < asked else ""
    what = f"{s.actors} actors{fewer} × {s.concurrency} {'threads' if s.mode == 'threads' else 'async'}"
    return what + (f" · fake {s.latency} s" if s.sender == "fake" else " · SMTP")


def _write_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    """campaign.json: what `bulkmail status` needs besides the ledger (the totals, the state)."""
    storage.write_text(storage.join(run_dir, "campaign.json"), json.dumps(manifest, indent=2))
