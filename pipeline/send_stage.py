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
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from . import ray_session, storage
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
SMTP_BATCHES_PER_ACTOR = 20  # with real SMTP, batches as large as leave each actor this many,
SMTP_BATCH_SECONDS = 20  # as the actor's sends in flight get through in this long at 1 s each,
SMTP_BATCH_CAP = {"threads": 2_000, "async": 8_000}  # and no more rows than this (_smtp_batch)


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


def batch_size_for(send: SendConfig, rows: int) -> int:
    if send.batch_size:
        return send.batch_size
    # One batch keeps an actor's workers busy for about one latency; two calls in flight per
    # actor keep the next batch queued behind it. Cap so every actor sees at least 4 batches,
    # otherwise the tail waits on one actor.
    per_actor_share = math.ceil(rows / (send.actors * 4)) if rows else 1
    rate = send.rate
    relay_rates = [r.rate for r in send.smtp.effective_relays if r.rate is not None]
    if relay_rates and send.sender == "smtp":
        # Relays with a rate pace the sends that chose them, as --rate paces all: size by their
        # sum (what the run sends per second at least, or at most when every relay has one).
        rate = min(rate, sum(relay_rates)) if rate is not None else sum(relay_rates)
    if rate is not None:
        # Rate-limited, a batch of `concurrency` drains in a fraction of a second, and the
        # per-batch costs (ledger flush, Ray Data hand-off: tens of ms on a loaded machine)
        # open gaps in the rate: measured 150/s for --rate 200 with batches of 20. A batch of
        # one second of the actor's share of the rate hides them.
        share = math.ceil(rate / send.actors)
        return max(1, min(per_actor_share, max(send.concurrency, share)))
    if send.mode == "async":
        # Tens of thousands of workers per actor: a batch of the whole pool drains it at every
        # batch boundary (the next batch only arrives once the last email of the previous one
        # is recorded), so the pool is fed in quarters, with more calls in flight (_calls).
        # Not below 1,000 rows (or the pool, if smaller): each call takes Ray Data tens of ms
        # to dispatch, and quarters of a small pool slowed its start (88% of ideal at 2 × 50).
        size = max(math.ceil(send.concurrency / 4), min(send.concurrency, 1000))
    else:
        # Threads: one pool a batch, and at least half a second of the pool's sends where the
        # latency is known (the fake sender): each call costs tens of ms, which halved the rate
        # of 10-row batches at 0.05 s (2 × 10 threads, 3,000 rows). Not more: batches of 1,000
        # rows at 8 × 100 threads, 0.5 s, gave 0.948 of ideal against 0.985 with one pool (100).
        size = send.concurrency
        if send.sender == "fake" and 0 < send.latency < 0.5:
            size = math.ceil(send.concurrency * 0.5 / send.latency)
    if send.sender == "smtp":
        size = max(size, _smtp_batch(send, rows))
    return max(1, min(size, per_actor_share))


def _smtp_batch(send: SendConfig, rows: int) -> int:
    """A real server's latency is not known before the run. Against a fast one a pool's batch
    is over in tens of ms, not much more than what Ray Data spends on each batch (milliseconds
    of the driver's CPU, and the pool waiting for the next one). Against smtp-sink on loopback,
    100,000 messages, 2 actors × 100 threads sent 4,200-4,500/s in batches of 100 and
    8,400-8,900/s in batches of 2,500; 2 × 2,000 async 19,600-20,300/s in 1,000 and
    21,900-22,200/s in 2,500 (docs/ray-notes.md). So batches grow with the list while every
    actor still gets SMTP_BATCHES_PER_ACTOR of them (the last ones, on fewer actors, then cost
    the window a twentieth at most), up to what the actor's sends in flight get through in
    SMTP_BATCH_SECONDS against a server that takes 1 s a message (100 threads: 2,000 rows):
    the progress line counts finished batches."""
    per_actor = math.ceil(rows / (send.actors * SMTP_BATCHES_PER_ACTOR)) if rows else 1
    in_flight = send.concurrency
    if send.mode == "async" and send.smtp.max_connections is not None:
        # Each connection carries a transaction and the next one's commands (wire.py).
        in_flight = min(in_flight, 2 * send.smtp.max_connections)
    return min(per_actor, SMTP_BATCH_SECONDS * in_flight, SMTP_BATCH_CAP[send.mode])


def pool_for(send: SendConfig, batches: int) -> SendConfig:
    """No more sender actors than batches (load_stage.Loaded.batches): the others would only
    start (about a second of CPU each on 2 cores), hold the pool's start for up to
    actors.POOL_START_BOUND, and send nothing (a short list, or a resume with little left)."""
    return dataclasses.replace(send, actors=batches) if 0 < batches < send.actors else send


def calls_per_actor(send: SendConfig, batch_size: int) -> int:
    """Batches in flight per actor: two in threads mode, four with SMTP; in async mode enough to
    hold twice the pool (a full pool plus as much again queued), each call a thread blocked on
    its batch."""
    if send.mode != "async":
        # A sending thread over SMTP holds two messages at once (the next one's commands go
        # out with this one's data, sending/threads.py): with two batches of one pool in
        # flight the queue ran dry at every batch's end, and the card against smtp-sink -w 1
        # kept 0.72-0.79 of ideal; with four 0.80-0.86 (README, "SMTP throughput").
        return 4 if send.sender == "smtp" else 2
    return max(2, min(64, math.ceil(3 * send.concurrency / batch_size)))


def send(loaded: Loaded, job: SendJob, *, config: CampaignConfig, hooks: Hooks,
         stages: Stages, lease: LeaseView | None = None) -> SendOutcome:
    """Send the rows the load left to send (on Ray, which the caller started); every outcome
    lands in the run's ledger."""
    import ray

    from .actors import Coordinator, RateLimiter, SendBatches
    send_cfg = job.send
    batch_size = loaded.block_rows  # the load cut the blocks to this (batch_size_for)
    calls = calls_per_actor(send_cfg, batch_size)
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
                               relay_limiters=relay_limiters)
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
