"""One function that runs a campaign, top to bottom as the data flows:
load → partition → send → ledger → report.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

# Ray (and .actors, which imports it) is imported only where a run needs it: the CLI turns
# every file, column and flag error into one line before that, about 0.5 s sooner.
from . import ledger, recipients, report, storage
from .config import DEFAULT_SUBJECT, CampaignConfig, SendConfig, check_campaign_name
from .errors import CampaignInterrupted, UsageError

RATE_WINDOW = 10.0  # seconds


@dataclass(frozen=True, kw_only=True)
class Progress:
    total: int
    sent: int
    failed: int
    abandoned: int
    retries: int
    elapsed: float
    rate: float  # emails/s over the last RATE_WINDOW seconds (start-up does not drag the ETA)

    @property
    def done(self) -> int:
        """Recipients with a final outcome (abandoned ones are not: a resume sends them)."""
        return self.sent + self.failed

    @property
    def eta(self) -> float | None:
        return (self.total - self.done - self.abandoned) / self.rate if self.rate > 0 else None


@dataclass
class Hooks:
    """How the library talks to whoever runs it, without printing: the CLI renders these."""

    on_progress: Callable[[Progress], None] | None = None
    on_info: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def info(self, text: str) -> None:
        if self.on_info:
            self.on_info(text)


class Stages:
    """Wall time per stage, each measured where its work finishes (Ray Data is lazy)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------- preparation

def campaign_name(config: CampaignConfig, input_path: str) -> str:
    if config.campaign:
        return config.campaign
    stem = os.path.basename(input_path.rstrip("/")).split(".")[0] or "campaign"
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem).strip("-._")
    return check_campaign_name(f"{stem or 'campaign'}-{dt.date.today():%Y%m%d}")


def _check_writable(runs_dir: str) -> None:
    if storage.is_uri(runs_dir):
        return
    probe = os.path.abspath(runs_dir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--runs-dir {runs_dir}: not a writable directory ({probe})")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything checked before Ray starts."""

    input: str
    campaign: str
    run_dir: str
    run_id: str
    lazy: pl.LazyFrame
    suppression: pl.DataFrame | None
    send: SendConfig  # config.send with defaults resolved against the input


def plan(config: CampaignConfig, *, hooks: Hooks | None = None) -> Plan:
    """Check flags, files and columns; raises UsageError before anything is written or started."""
    hooks = hooks or Hooks()
    _check_writable(config.runs_dir)
    if config.input is None:
        path = os.path.join(config.data_dir, f"recipients-{config.default_rows}.parquet")
        if not os.path.exists(path):
            hooks.info(f"generating {config.default_rows:,} recipients into {path} (once)")
        input_path = recipients.default_input(config.data_dir, config.default_rows)
    else:
        input_path = config.input
    lazy = recipients.scan(input_path)
    suppression = recipients.read_suppression(config.suppress) if config.suppress else None
    name = campaign_name(config, input_path)
    columns = lazy.collect_schema().names()
    send = config.send
    if send.message.subject == DEFAULT_SUBJECT and "name" not in columns:
        # Only the default adapts (a list without names is fine); a subject the user wrote
        # that names a missing field is an error.
        send = dataclasses.replace(send, message=dataclasses.replace(send.message, subject="Hello"))
    from .templates import check_fields  # templates name fields that must exist
    check_fields(send.message, columns)
    if config.send.sender == "smtp" and not config.dry_run:
        from .smtp import preflight  # password present, CA file exists: before Ray starts
        preflight(config.send.smtp)
    return Plan(input=input_path, campaign=name, run_dir=storage.join(config.runs_dir, name),
                run_id=ledger.new_run_id(), lazy=lazy, suppression=suppression, send=send)


# --------------------------------------------------------------------------- Ray

def _ray_import_env(config: CampaignConfig) -> None:
    if not (config.address or os.environ.get("RAY_ADDRESS")):
        # A Ray started here serves this machine only: keep its GCS, raylet and workers on
        # 127.0.0.1 rather than the primary interface's address. Ray reads this at import
        # (ray_constants.ENABLE_RAY_CLUSTER), so it must be set before `import ray`.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _ensure_ray(config: CampaignConfig, send: SendConfig, hooks: Hooks) -> bool:
    """Start or join Ray. Returns True when this call started it (and so must stop it)."""
    _ray_import_env(config)
    import ray
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    # address=None would not mean "start one": ray.init then joins any Ray already running on
    # this machine (`ray start`, or another run's), and num_cpus makes that fail. "local"
    # always starts this run's own.
    kwargs: dict[str, Any] = dict(address=address or "local", logging_level=logging.WARNING,
                                  include_dashboard=config.dashboard if address is None else None)
    if address is None:
        # Sending is I/O-bound: senders ask for a fraction of a CPU, and Ray is given at least
        # enough logical CPUs for all of them plus one for Ray Data's own tasks (8 actors at
        # 1 CPU each never start on 2 cores; RAY-NOTES.md).
        need = math.ceil(send.actors * send.cpus_per_actor) + 1
        kwargs["num_cpus"] = config.num_cpus or max(os.cpu_count() or 1, need)
        if not send.metrics:
            kwargs["_system_config"] = {"enable_metrics_collection": False}
    # ray.init installs the core worker's own SIGTERM handler (it logs and dies with code 15),
    # which would skip the caller's graceful stop: put the caller's handlers back.
    saved = ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
             if threading.current_thread() is threading.main_thread() else {})
    ctx = ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    for signum, handler in saved.items():
        if handler is not None:
            signal.signal(signum, handler)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        hooks.info(f"Ray dashboard: http://{url}")
    return True


def _batch_size(send: SendConfig, rows: int) -> int:
    if send.batch_size:
        return send.batch_size
    # One batch keeps an actor's workers busy for about one latency; two calls in flight per
    # actor keep the next batch queued behind it. Cap so every actor sees at least 4 batches,
    # otherwise the tail waits on one actor.
    per_actor_share = math.ceil(rows / (send.actors * 4)) if rows else 1
    if send.rate is not None:
        # Rate-limited, a batch of `concurrency` drains in a fraction of a second, and the
        # per-batch costs (ledger flush, Ray Data hand-off: tens of ms on a loaded machine)
        # open gaps in the rate: measured 150/s for --rate 200 with batches of 20. A batch of
        # one second of the actor's share of the rate hides them.
        share = math.ceil(send.rate / send.actors)
        return max(1, min(per_actor_share, max(send.concurrency, share)))
    if send.mode == "async":
        # Tens of thousands of workers per actor: a batch of the whole pool drains it at every
        # batch boundary (the next batch only arrives once the last email of the previous one
        # is recorded), so the pool is fed in quarters, with more calls in flight (_calls).
        # Not below 1,000 rows (or the pool, if smaller): each call takes Ray Data tens of ms
        # to dispatch, and quarters of a small pool slowed its start (88% of ideal at 2 × 50).
        quarter = max(math.ceil(send.concurrency / 4), min(send.concurrency, 1000))
        return max(1, min(quarter, per_actor_share))
    return max(1, min(send.concurrency, per_actor_share))


def _calls_per_actor(send: SendConfig, batch_size: int) -> int:
    """Batches in flight per actor: two in threads mode; in async mode enough to hold twice the
    pool (a full pool plus as much again queued), each call a thread blocked on its batch."""
    if send.mode != "async":
        return 2
    return max(2, min(64, math.ceil(3 * send.concurrency / batch_size)))


def partition(frame: pl.DataFrame, *, batch_size: int, max_blocks: int = 2000) -> Any:
    """Hand rows to Ray as a Dataset of many blocks (one `from_arrow` table is ONE block)."""
    import ray
    table = frame.to_arrow()
    rows = table.num_rows
    blocks = max(1, min(math.ceil(rows / batch_size), max_blocks))
    per_block = math.ceil(rows / blocks / batch_size) * batch_size
    tables = [table.slice(i, per_block) for i in range(0, rows, per_block)] or [table]
    # from_blocks (Ray 2.60, a DeveloperAPI) computes each block's metadata here; from_arrow
    # runs one remote task per block for it, in a worker process it first has to start: 1.4 s
    # of CPU for the 160 blocks of a 1M async run.
    from_blocks = getattr(ray.data, "from_blocks", None)
    return from_blocks(tables) if from_blocks else ray.data.from_arrow(tables)


def _stats(ds: Any) -> list[dict[str, Any]]:
    """Ray Data's per-operator stats, JSON-able."""
    try:
        summary = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - stats are a report nicety, never a failure
        return []
    out: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        for parent in getattr(node, "parents", []) or []:
            walk(parent)
        for op in getattr(node, "operators_stats", []) or []:
            entry: dict[str, Any] = {"operator": getattr(op, "operator_name", "?"),
                                     "time_total_s": getattr(op, "time_total_s", None)}
            for attr in ("wall_time", "cpu_time", "udf_time", "output_num_rows"):
                value = getattr(op, attr, None)
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    value = dataclasses.asdict(value)
                if isinstance(value, dict):
                    entry[attr] = {k: v for k, v in value.items() if isinstance(v, (int, float))}
            out.append(entry)
    walk(summary)
    return out


# --------------------------------------------------------------------------- the run

def run_campaign(config: CampaignConfig, *, hooks: Hooks | None = None) -> report.Report:
    """Send the campaign `config` describes; return its report.

    Raises UsageError for user mistakes (before Ray starts) and CampaignInterrupted after a
    requested stop (the ledger is flushed and the campaign can be resumed).
    """
    hooks = hooks or Hooks()
    send = config.send
    stages = Stages()
    started_at = time.time()

    with stages.time("load"):
        p = plan(config, hooks=hooks)
        _prefetch_imports(config)  # flags and files are checked: import Ray while polars loads
        from .templates import with_bodies
        send = with_bodies(p.send)  # actors get the template text, not a path to read
        done = None if config.restart else ledger.done_ids(p.run_dir, retry_failed=config.retry_failed)
        header_fields = ("name",) + tuple(f for f in _subject_fields(send) if f != "name")
        loaded = recipients.load(p.lazy, done=done, suppression=p.suppression,
                                 header_fields=header_fields, source=p.input)

    if config.dry_run:  # renders only: the ledger is neither read for writing nor touched
        from .templates import write_dry_run
        with stages.time("render"):
            written = write_dry_run(loaded.to_send.head(config.dry_run), p.run_dir, p.campaign, send)
        hooks.info(f"dry run: wrote {written} .eml files under {storage.join(p.run_dir, 'dry-run')}")
        return report.build_dry_run(p, loaded, stages.seconds, written)

    if config.restart:  # only now that the input has loaded cleanly: a bad input keeps the old ledger
        storage.delete_dir(ledger.ledger_dir(p.run_dir))
        storage.delete_file(ledger.ledger_file(p.run_dir))
    storage.makedirs(p.run_dir)
    ledger.write_frame(p.run_dir, loaded.settled.with_columns(run=pl.lit(p.run_id)),
                       name=f"load-{p.run_id}")
    if loaded.already_done:
        hooks.info(f"resuming campaign {p.campaign}: {loaded.already_done:,} recipients already "
                   "done are skipped")

    totals = {"sent": 0, "failed": 0, "abandoned": 0, "retries": 0, "crashed": 0, "skipped": 0}
    ray_stats: list[dict[str, Any]] = []
    interrupted = False
    started_ray = False
    batch_size = _batch_size(send, loaded.to_send.height)
    calls = _calls_per_actor(send, batch_size)
    try:
        if loaded.to_send.height:
            with stages.time("ray_start"):
                import ray

                from .actors import Coordinator, RateLimiter, SendBatches
                started_ray = _ensure_ray(config, send, hooks)
                from ray.data import DataContext
                DataContext.get_current().enable_progress_bars = False
                coordinator = Coordinator.options(  # type: ignore[attr-defined]
                    scheduling_strategy=_this_node()).remote()
                # One schedule of send slots for every actor on every node (ratelimit.py).
                rate_limiter = None
                if send.rate is not None:
                    rate_limiter = RateLimiter.options(
                        scheduling_strategy=_this_node()).remote(send.rate)

            with stages.time("partition"):
                ds = partition(loaded.to_send, batch_size=batch_size)

            with stages.time("send"):
                out = ds.map_batches(
                    SendBatches,
                    fn_constructor_kwargs=dict(run_dir=p.run_dir, campaign=p.campaign,
                                               run_id=p.run_id, config=send,
                                               coordinator=coordinator, fields=loaded.fields,
                                               rate_limiter=rate_limiter),
                    batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
                    compute=ray.data.ActorPoolStrategy(
                        size=send.actors, max_tasks_in_flight_per_actor=calls,
                        max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True),
                    num_cpus=send.cpus_per_actor, scheduling_strategy="SPREAD",
                    ray_remote_args_fn=_actor_names(p.campaign),
                    # Actors on other nodes do not share the driver's environment: the
                    # storage settings (S3 endpoint, region; never credentials) travel here.
                    runtime_env=_storage_env(p.run_dir),
                )
                interrupted = _consume(out, loaded.to_send.height, totals, coordinator, hooks, send)
                ray_stats = _stats(out)
            if config.timeline:
                ray.timeline(filename=config.timeline)
                hooks.info(f"timeline written to {config.timeline} (open in chrome://tracing or "
                           "https://ui.perfetto.dev)")
    finally:
        if started_ray:
            with stages.time("ray_stop"):
                ray.shutdown()

    with stages.time("ledger"):
        full, journal = ledger.consolidate_with_journal(p.run_dir)
        this_run = journal.filter(pl.col("run") == p.run_id)

    with stages.time("report"):
        rep = report.build(
            campaign=p.campaign, run_id=p.run_id, run_dir=p.run_dir, input=p.input, send=send,
            batch_size=batch_size, loaded=loaded, this_run=this_run, ledger=full,
            stages=stages.seconds, ray_stats=ray_stats, totals=totals, started_at=started_at,
            interrupted=interrupted)
        if config.charts:
            rep["charts"] = report.write_charts(rep, this_run, p.run_dir)
    # Written after the stage closes so that the report holds its own stage's time too.
    rep["stages_s"]["report"] = round(stages.seconds["report"], 3)
    rep["total_s"] = round(time.time() - started_at, 3)
    report.write(rep, p.run_dir)
    if interrupted:
        raise CampaignInterrupted(f"campaign {p.campaign} stopped before the end", report=rep)
    return rep


def _prefetch_imports(config: CampaignConfig) -> None:
    """Import Ray, Ray Data and the actors module (1.2 s on this machine) and, for charts,
    matplotlib (0.3 s) in a background thread, overlapping the load stage's polars work
    (which releases the GIL). Importing starts nothing; `_ensure_ray` starts Ray later, so a
    data error found by the load still ends the run before Ray starts."""
    def work() -> None:
        try:
            _ray_import_env(config)
            import ray.data  # noqa: F401

            from . import actors  # noqa: F401
            if config.charts:
                import matplotlib.backends.backend_agg  # noqa: F401
                import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - the real import, later, reports any problem
            pass
    threading.Thread(target=work, name="prefetch-imports", daemon=True).start()


def _subject_fields(send: SendConfig) -> tuple[str, ...]:
    """Fields that reach a header: the subject's and the unsubscribe URL's (templates.py)."""
    from .templates import header_fields
    return tuple(sorted(header_fields(send.message)))


def _this_node() -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _storage_env(run_dir: str) -> dict[str, Any] | None:
    env = storage.forwarded_env() if storage.is_uri(run_dir) else {}
    return {"env_vars": env} if env else None


def _actor_names(campaign: str) -> Callable[[], dict[str, Any]]:
    """Each pool actor gets a readable name, so the dashboard's timeline reads well."""
    counter = iter(range(1_000_000))
    prefix = f"bulkmail-{campaign}-{os.getpid()}"

    def remote_args() -> dict[str, Any]:
        return {"name": f"{prefix}-sender-{next(counter)}"}
    return remote_args


def _consume(out: Any, total: int, totals: dict[str, int], coordinator: Any, hooks: Hooks,
             send: SendConfig) -> bool:
    """Drive the send stage; returns True if a stop was requested."""
    t0 = time.perf_counter()
    stopped = False
    deadline: float | None = None

    def watch() -> None:
        hooks.stop.wait()
        try:
            coordinator.stop.remote()
        except Exception:  # noqa: BLE001
            pass
    threading.Thread(target=watch, name="stop-relay", daemon=True).start()

    history: collections.deque[tuple[float, int]] = collections.deque([(t0, 0)])

    def progress(now: float) -> Progress:
        done = totals["sent"] + totals["failed"]
        history.append((now, done))
        while len(history) > 2 and now - history[1][0] > RATE_WINDOW:
            history.popleft()
        t_old, done_old = history[0]
        rate = (done - done_old) / (now - t_old) if now > t_old else 0.0
        return Progress(total=total, sent=totals["sent"], failed=totals["failed"],
                        abandoned=totals["abandoned"], retries=totals["retries"],
                        elapsed=now - t0, rate=rate)

    last_emit = 0.0
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        assert isinstance(batch, pa.Table)
        for k in totals:
            totals[k] += int(pa.compute.sum(batch.column(k)).as_py() or 0)
        now = time.perf_counter()
        if hooks.on_progress and (now - last_emit > 0.2):
            last_emit = now
            hooks.on_progress(progress(now))
        if hooks.stop.is_set():
            stopped = True
            if deadline is None:
                deadline = now + send.stop_timeout
            elif now > deadline:
                break
    if hooks.on_progress:
        hooks.on_progress(progress(time.perf_counter()))
    return stopped or hooks.stop.is_set()
