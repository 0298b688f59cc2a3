"""The send stage: the load's rows in, every recipient sent (or left for the resume) and
recorded, out.

`send(loaded, job, ...)` cuts the rows into blocks, runs `SendBatches` over them through
`map_batches` with an actor pool, follows the results for progress, and stops in seconds when
asked to (or when the campaign lease is lost). Ray is started by the caller (campaign.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from . import batching, ray_session, storage
from .config import CampaignConfig, SendConfig
from .hooks import Hooks, Progress, Stages

if TYPE_CHECKING:  # load_stage imports Ray, which the CLI imports only once a run needs it
    from .load_stage import Loaded

RATE_WINDOW = 10.0  # seconds of history behind the live rate (and so the ETA)
POLL = 0.2  # seconds between the driver's looks at progress, the stop flag and the lease
# After a stop, how long the results thread may take to see one more batch come back and close
# Ray Data's iterator. Ray must not be shut down under a thread still inside the iterator: the
# core worker then ends the whole process ("already been shutdown"), before the ledger is folded.
FEEDER_JOIN = 10.0
# At most this long the later waves of a load wait for the sender pool to be up (8 actors take
# about 6.5 s to start on 2 cores): they then load while it sends.
LATER_WAVES_GATE = 60.0
PREFETCH_JOIN = 30.0  # seconds: the imports take 1-2 s, more on a loaded machine


@dataclass(frozen=True, kw_only=True)
class SendJob:
    """What the send stage needs to know about the run."""

    campaign: str
    run_dir: str
    run_id: str
    epoch: int  # the campaign lease's, written into every ledger row
    send: SendConfig
    fields: tuple[str, ...]  # template fields present in the rows


@dataclass(frozen=True, kw_only=True)
class Totals:
    sent: int = 0
    failed: int = 0
    abandoned: int = 0
    retries: int = 0
    crashed: int = 0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class SendOutcome:
    totals: Totals
    batch_size: int
    interrupted: bool  # a stop was requested, or the lease was lost
    lease_lost: bool
    ray_stats: tuple[dict[str, Any], ...]


class LeaseView(Protocol):
    """What the stage reads of the campaign lease (lease.Lease): until when this run may send
    (driver clock), and whether another run has taken the campaign over."""

    @property
    def valid_until(self) -> float: ...
    @property
    def lost(self) -> bool: ...


def send(loaded: Loaded, job: SendJob, *, config: CampaignConfig, hooks: Hooks,
         stages: Stages, lease: LeaseView | None = None) -> SendOutcome:
    """Send the rows the load left to send (on Ray, which the caller started); every outcome
    lands in the run's ledger."""
    import ray

    from .actors import Coordinator, RateLimiter, SendBatches
    send_cfg = job.send
    batch_size = loaded.block_rows  # the load cut the blocks to this (batching.batch_size_for)
    calls = batching.calls_per_actor(send_cfg, batch_size)
    valid_until = lease.valid_until if lease is not None else None
    coordinator = Coordinator.options(  # type: ignore[attr-defined]
        scheduling_strategy=ray_session.this_node()).remote(valid_until)
    # One schedule of send slots for every actor on every node (sending/ratelimit.py).
    rate_limiter = None
    if send_cfg.rate is not None:
        rate_limiter = RateLimiter.options(
            scheduling_strategy=ray_session.this_node()).remote(send_cfg.rate)
    # And one schedule per relay with a rate of its own, shared the same way.
    relay_limiters = {
        r.name: RateLimiter.options(scheduling_strategy=ray_session.this_node()).remote(r.rate)
        for r in send_cfg.smtp.effective_relays
        if r.rate is not None and send_cfg.sender == "smtp"}

    stage_over = threading.Event()
    if lease is not None and valid_until is not None:
        threading.Thread(target=_keep_deadline, args=(coordinator, lease, valid_until, stage_over),
                         name="lease-deadline", daemon=True).start()
    try:
        with stages.time("partition"):
            # A load in waves: the later waves start loading once the sender pool is up.
            gate = [coordinator.pool_up.remote(LATER_WAVES_GATE)] if loaded.later else []
            ds = loaded.dataset(coordinator, gate)

        with stages.time("send"):
            constructor = dict(run_dir=job.run_dir, campaign=job.campaign, run_id=job.run_id,
                               epoch=job.epoch, config=send_cfg, coordinator=coordinator,
                               fields=job.fields, rate_limiter=rate_limiter,
                               relay_limiters=relay_limiters,
                               warm=batching.warm_connections(send_cfg, batch_size))
            out = ds.map_batches(SendBatches.for_campaign(job.campaign),
                                 **SendBatches.map_batches_kwargs(
                                     send_cfg, batch_size=batch_size, calls=calls,
                                     constructor=constructor,
                                     runtime_env=storage.runtime_env(job.run_dir)))
            follow = _Follow(out, loaded.expected, coordinator, hooks, send_cfg, lease)
            totals, interrupted = follow.run()
            ray_stats = () if interrupted else tuple(_stats(out))
    finally:
        stage_over.set()
    if config.timeline:
        ray.timeline(filename=config.timeline)
        hooks.info(f"timeline written to {config.timeline} (open in chrome://tracing or "
                   "https://ui.perfetto.dev)")
    return SendOutcome(totals=totals, batch_size=batch_size, interrupted=interrupted,
                       lease_lost=follow.lease_lost, ray_stats=ray_stats)


def _keep_deadline(coordinator: Any, lease: LeaseView, pushed: float,
                   stage_over: threading.Event) -> None:
    """Hands each renewal of the lease to the coordinator for as long as the stage runs. The
    actors stop once its deadline passes, so it must stay current from the coordinator's start,
    through the cutting of the blocks and the actors' start (together 7-9 s on a busy 2-core
    machine, more than the 7.5 s a 10 s lease is trusted for), not only while results come.
    `pushed`: the deadline the coordinator was created with."""
    while not stage_over.wait(POLL):
        if lease.valid_until != pushed:
            pushed = lease.valid_until
            coordinator.extend.remote(pushed)


class _Follow:
    """Follows the send stage from the driver: sums the per-batch summaries for progress,
    notices a lost lease (`_keep_deadline` keeps the coordinator's deadline current), and on a
    stop lets the sends in flight finish (bounded by --stop-timeout), then leaves every batch
    not started for the resume instead of walking it through the actors."""

    def __init__(self, out: Any, total: Callable[[], int], coordinator: Any, hooks: Hooks,
                 send: SendConfig, lease: LeaseView | None) -> None:
        self.out = out
        self.total = total
        self.coordinator = coordinator
        self.hooks = hooks
        self.send = send
        self.lease = lease
        self.lease_lost = False
        self.counts: collections.Counter[str] = collections.Counter()
        self._results: queue.SimpleQueue[pa.Table | BaseException | None] = queue.SimpleQueue()
        self._quit = threading.Event()
        self._history: collections.deque[tuple[float, int]] = collections.deque()

    def _feed(self) -> None:
        """Pull results on a thread of its own, so the driver can act on a stop at once."""
        try:
            for batch in self.out.iter_batches(batch_size=None, batch_format="pyarrow",
                                               prefetch_batches=0):
                self._results.put(batch)
                if self._quit.is_set():
                    break  # closing the iterator shuts Ray Data's executor down
            self._results.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            self._results.put(exc)

    def run(self) -> tuple[Totals, bool]:
        t0 = time.perf_counter()
        self._history.append((t0, 0))
        feeder = threading.Thread(target=self._feed, name="send-results", daemon=True)
        feeder.start()
        deadline: float | None = None  # set once stopping
        last_emit = 0.0
        try:
            while True:
                try:
                    item = self._results.get(timeout=POLL)
                except queue.Empty:
                    item = pa.table({})
                if item is None:
                    break
                if isinstance(item, BaseException):
                    if deadline is not None:
                        break  # the stage is being torn down under a stop
                    raise item
                if item.num_columns:
                    for k in ("sent", "failed", "abandoned", "retries", "crashed", "skipped"):
                        self.counts[k] += int(pa.compute.sum(item.column(k)).as_py() or 0)
                now = time.perf_counter()
                if self.lease is not None and self.lease.lost:
                    self.lease_lost = True
                if deadline is None and (self.hooks.stop.is_set() or self.lease_lost):
                    self.coordinator.stop.remote()
                    deadline = now + self.send.stop_timeout
                if self.hooks.on_progress and (now - last_emit > POLL):
                    last_emit = now
                    self.hooks.on_progress(self._progress(now, t0, deadline is not None))
                if deadline is not None and (now > deadline or self._quiet()):
                    break
        finally:
            self._quit.set()
            # Once stopping, every batch left comes back at once (NOT_STARTED), so the thread
            # sees the next one, breaks, and closing the iterator shuts the executor down.
            feeder.join(FEEDER_JOIN)
        if self.hooks.on_progress:
            self.hooks.on_progress(self._progress(time.perf_counter(), t0, deadline is not None))
        totals = Totals(**{f.name: self.counts[f.name] for f in dataclasses.fields(Totals)})
        # Batches left unstarted without a stop asked for: the coordinator saw the lease's
        # deadline pass (this process was paused past it). The run did not finish either.
        return totals, deadline is not None or self.hooks.stop.is_set() or totals.abandoned > 0

    def _quiet(self) -> bool:
        """No batch is sending any more: each one that started has flushed its ledger rows."""
        import ray
        try:
            return int(ray.get(self.coordinator.active.remote(), timeout=POLL * 5)) <= 0
        except Exception:  # noqa: BLE001 - a busy coordinator: ask again next time
            return False

    def _progress(self, now: float, t0: float, stopping: bool) -> Progress:
        c = self.counts
        done = c["sent"] + c["failed"]
        history = self._history
        history.append((now, done))
        while len(history) > 2 and now - history[1][0] > RATE_WINDOW:
            history.popleft()
        t_old, done_old = history[0]
        rate = (done - done_old) / (now - t_old) if now > t_old else 0.0
        return Progress(total=self.total(), sent=c["sent"], failed=c["failed"],
                        abandoned=c["abandoned"], retries=c["retries"], elapsed=now - t0,
                        rate=rate, stopping=stopping)


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


def _prefetch_imports(config: CampaignConfig) -> threading.Thread:
    """Import Ray, Ray Data and the actors module (1.2 s on this machine) and, for charts,
    matplotlib (0.3 s) in a background thread while the run starts Ray (`ray.init` waits on
    Ray's processes, part of it with the CPU idle). Importing starts nothing: an error found
    before Ray starts still ends the run before it."""
    def work() -> None:
        try:
            import ray.data  # noqa: F401

            from . import actors  # noqa: F401
            if config.charts:
                import matplotlib.backends.backend_agg  # noqa: F401
                import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - the real import, later, reports any problem
            pass
    thread = threading.Thread(target=work, name="prefetch-imports", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def prefetching(config: CampaignConfig) -> Iterator[None]:
    """Ray's imports on a thread (`_prefetch_imports`) while the run starts, joined before the
    run returns. A process that exits while the thread is inside an extension module's import
    can abort ("FATAL: exception not rethrown", exit -6): seen once in the suite when the
    thread ran from before the lease and a launch that found its campaign already running
    exited. The caller enters this once every flag, file and the lease are checked.

    Ray's environment is set here, before the thread starts: Ray reads it when first imported,
    by whichever thread, and the caller may import a stage module (which imports Ray) before
    the thread has run. A dry run once did, in CI: Ray came up without token authentication
    and could not join the cluster."""
    ray_session.prepare_import(config)
    thread = _prefetch_imports(config)
    try:
        yield
    finally:
        thread.join(PREFETCH_JOIN)  # done long ago, unless the run failed early
