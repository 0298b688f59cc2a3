"""The Ray side of sending: the per-run coordinator actor and the batch UDF run by the pool.

`SendBatches` is a Ray Data callable class: setup in `__init__` (sender, engine, ledger
writer), work in `__call__(batch)`. Its `map_batches` arguments live beside it
(`SendBatches.map_batches_kwargs`), as Ray's own batch stages keep theirs with their UDF.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import math
import os
import sys
import threading
import time
from typing import Any

import pyarrow as pa
import ray

from . import ledger, messages
from .config import SendConfig
from .partitions import PART
from .sending import AsyncSender, Sender, make_sender, ratelimit
from .sending.aio import AsyncEngine
from .sending.engine import BatchCounts, Engine
from .sending.threads import ThreadEngine

SUMMARY_SCHEMA = pa.schema([
    ("rows", pa.int64()), ("sent", pa.int64()), ("failed", pa.int64()),
    ("abandoned", pa.int64()), ("skipped", pa.int64()), ("attempts", pa.int64()),
    ("retries", pa.int64()), ("crashed", pa.int64()), ("finished_at", pa.float64()),
])
NOT_STARTED = 0  # begin_batch's answer once the run stops: the batch is left for the resume
# How long the first sender actor up holds its first batch for the others (Coordinator.
# wait_for_pool). Ray Data hands batches to each actor as it comes up: on 2 cores the card's 8
# actors sent their first emails 0.3-1.8 s apart, each actor's starting slowed the ones already
# sending, and the last batches ran on fewer actors (README, "The card against a slow
# server"). Bounded, so a cluster still adding nodes for the rest sends with those up.
POOL_START_BOUND = 10.0
# The GIL's switch interval in a threads-mode sender actor (CPython's default is 5 ms). A thread
# waiting for the GIL wakes every interval and asks the holder to let go: when 100 sending
# threads get their replies at once (a slow server answers in bursts), each woke many times a
# burst for nothing. The card's 8 actors against smtp-sink -w 1, 8 s of perf stat in alternating
# runs: 94,000-245,000 system calls and 47,000-125,000 context switches at 5 ms, 71,000-90,000
# and 34,000-45,000 at 50 ms (docs/ray-notes.md, "The GIL's switch interval"). A sending thread
# still lets go at every read and write, and nothing in the actor computes for 50 ms without one.
THREAD_SWITCH_INTERVAL = 0.05


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Per-run shared state the sender actors consult: batch attempt counts, the batches under
    way, whether they may still send (the stop flag and the campaign lease's deadline), and
    which of them are up, so that they start sending together (POOL_START_BOUND).

    It asks for no CPU and is pinned to the driver's node, so it lives exactly as long as the
    run, and its clock is the driver's, the clock the lease deadline was computed with.
    """

    def __init__(self, valid_until: float | None = None) -> None:
        self._attempts: dict[str, int] = {}
        self._stopping = False
        self._active = 0
        self._valid_until = valid_until  # None: no lease (it never runs out)
        # The sender actors set up so far, by name: a restarted actor keeps its actor id (and
        # so its name), and must not stand in for one that is not up yet.
        self._up: set[str] = set()
        self._first_up: float | None = None
        self._pool_up = asyncio.Event()  # the pool's wait is over: all up, or stopping

    def sender_up(self, actor: str, pool: int) -> None:
        """Sender actor `actor`, of a pool of `pool`, has finished its setup."""
        self._up.add(actor)
        if self._first_up is None:
            self._first_up = time.monotonic()
        if len(self._up) >= pool:
            self._pool_up.set()

    async def wait_for_pool(self, bound: float) -> int:
        """Return once every sender actor is up, a stop was asked, or `bound` seconds after the
        first one was up, whichever comes first (a lease that runs out meanwhile is found by
        begin_batch, which then starts nothing); how many are up."""
        if not self._pool_up.is_set() and not self.is_stopping():
            start = self._first_up if self._first_up is not None else time.monotonic()
            left = start + bound - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_up.wait(), max(0.0, left))
        return len(self._up)

    def begin_batch(self, key: str) -> int:
        """Count an attempt at a batch as it starts running (above 1: a worker died running
        it). Once the run is stopping, nothing new starts: NOT_STARTED."""
        if self.is_stopping():
            return NOT_STARTED
        n = self._attempts.get(key, 0) + 1
        self._attempts[key] = n
        self._active += 1
        return n

    def end_batch(self) -> None:
        """A batch's sends are over and its ledger rows are flushed."""
        self._active -= 1

    def active(self) -> int:
        return self._active

    def attempts(self, key: str) -> int:
        """How often a batch has started running (0: never, this is its first delivery)."""
        return self._attempts.get(key, 0)

    def extend(self, valid_until: float) -> None:
        """The lease was renewed: sending may go on until `valid_until` (driver clock). An
        async actor (wait_for_pool) may run two renewals sent unawaited out of order: the
        later deadline holds."""
        self._valid_until = max(valid_until, self._valid_until or valid_until)

    def stop(self) -> None:
        self._stopping = True
        self._pool_up.set()  # actors waiting for the pool go on, and find the run stopping

    async def pool_up(self, bound: float) -> None:
        """Return once every sender actor is up, or a stop was asked, or after `bound` seconds:
        the gate of a load's later waves (load_waves.py). It reads no deadline: asked as the
        coordinator starts, before the lease's first renewal reaches it, is_stopping could
        find the first deadline passed and stop a run that is still renewing (seen in the
        suite with --lease-ttl 1)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pool_up.wait(), bound)

    def stop_asked(self) -> bool:
        """Whether a stop was asked or seen, without judging the deadline (see pool_up)."""
        return self._stopping

    def is_stopping(self) -> bool:
        if not self._stopping and self._valid_until is not None and time.time() > self._valid_until:
            self._stopping = True  # the driver stopped renewing: a taker may already be sending
        return self._stopping


# A rate limit's one authority (sending/ratelimit.py): the global one (--rate), and one per
# relay with a `rate`. Pinned to the driver's node by the caller, like the Coordinator, and never
# restarted: its state is the schedule itself.
RateLimiter = ray.remote(num_cpus=0, max_restarts=0)(ratelimit.SlotSchedule)


def _summary(rows: int, counts: BatchCounts, skipped: int = 0, crashed: int = 0) -> pa.Table:
    return pa.table({
        "rows": [rows], "sent": [counts.sent], "failed": [counts.failed],
        "abandoned": [counts.abandoned], "skipped": [skipped], "attempts": [counts.attempts],
        "retries": [counts.retries], "crashed": [crashed], "finished_at": [time.time()],
    }, schema=SUMMARY_SCHEMA)


class SendBatches:
    """Sends each batch of recipients through one long-lived engine per actor."""

    @classmethod
    def for_campaign(cls, campaign: str) -> type[SendBatches]:
        """This class under a name that carries the campaign: the dashboard lists pool actors
        by their UDF's class name (`MapWorker(MapBatches(SendBatches[twin]))`), and Ray 2.60
        deprecates the only way to name them one by one (`ray_remote_args_fn`)."""
        return type(f"SendBatches[{campaign}]", (cls,), {"__module__": cls.__module__})

    @staticmethod
    def map_batches_kwargs(send: SendConfig, *, batch_size: int, calls: int,
                           constructor: dict[str, Any],
                           runtime_env: dict[str, Any] | None) -> dict[str, Any]:
        """Everything `Dataset.map_batches` needs to run this UDF as the send stage. Only
        arguments Ray 2.60 does not deprecate: no `ray_remote_args_fn` (per-actor names) and no
        `scheduling_strategy`; Ray Data spreads actors over the nodes by default."""
        return dict(
            fn_constructor_kwargs=constructor, batch_size=batch_size, batch_format="pyarrow",
            zero_copy_batch=True,
            # `calls` batches in flight per actor, on as many threads, so the engine's pool
            # stays full across batch boundaries (docs/ray-notes.md).
            compute=ray.data.ActorPoolStrategy(
                size=send.actors, max_tasks_in_flight_per_actor=calls,
                max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True),
            num_cpus=send.cpus_per_actor,
            # Actors on other nodes do not share the driver's environment: the storage
            # settings (S3 endpoint, region; never credentials) travel here.
            runtime_env=runtime_env)

    def __init__(self, *, run_dir: str, campaign: str, run_id: str, epoch: int, config: SendConfig,
                 coordinator: Any, fields: tuple[str, ...], rate_limiter: Any = None,
                 relay_limiters: dict[str, Any] | None = None, warm: bool = False) -> None:
        # The cyclic GC, not sending, was half of an async actor's CPU: asyncio allocates a few
        # container objects per email (future, timer handle, coroutine), so at the default
        # threshold (700) a young collection ran every ~100 emails and the older generations
        # (25,000 worker coroutines, the queued messages) were walked again and again: 18.6 µs
        # of CPU per email, 9.8 µs with these thresholds (in-process, 25,000 workers at 0.5 s).
        # Refcounting frees nearly everything, so collecting rarely costs little memory. The
        # actor's process does nothing but send.
        gc.set_threshold(50_000, 20, 100)
        if config.mode != "async":
            sys.setswitchinterval(THREAD_SWITCH_INTERVAL)
        # Collecting rarely leaves the cycles of a whole run for the interpreter's final
        # collection when the pool winds down: 2-3 s of CPU per actor after a 1M run (py-spy:
        # gc_collect_main at exit), on the same cores as the ledger's fold, which then took
        # 2-3 s instead of 0.5 s. At exit (atexit runs before that collection) the ledger is
        # closed and the heap frozen, left for the OS to reclaim.
        atexit.register(self._at_exit)
        ctx = ray.get_runtime_context()
        # Pool actors have no names of their own (Ray 2.60 deprecates the only way to give
        # them one); the id's leading hex is unique, its tail is the job id.
        self.actor = f"sender-{(ctx.get_actor_id() or os.urandom(6).hex())[:12]}"
        self.node = ctx.get_node_id() or "local"
        self.run_dir = run_dir
        self.campaign = campaign
        self.config = config
        self.coordinator = coordinator
        self.fields = fields
        self.domain = messages.id_domain(config.message.from_addr)
        self.ledger = ledger.LedgerWriter(run_dir, writer=self.actor, node=self.node, run=run_id,
                                          epoch=epoch, flush_seconds=config.flush_seconds)
        # Each rated relay's schedule (a RateLimiter of its own, send_stage.py): this actor's
        # client of it, handed to the sender, which waits for a slot of the relay it chose.
        rates = {r.name: r.rate for r in config.smtp.effective_relays if r.rate is not None}
        self.relay_limiters = {name: _limiter(handle, rates[name], config.concurrency)
                               for name, handle in (relay_limiters or {}).items()}
        sender = make_sender(config, campaign=campaign, limiters=self.relay_limiters)
        from .metrics import SendMetrics
        self.metrics = (SendMetrics(campaign=campaign, actor=self.actor, node=self.node)
                        if config.metrics else None)
        self.limiter = (_limiter(rate_limiter, config.rate, config.concurrency)
                        if rate_limiter is not None and config.rate is not None else None)
        self._calls = 0  # batches under way in this actor (Ray Data runs two at a time)
        self._calls_lock = threading.Lock()
        self._retry_lock = threading.Lock()  # one retried (crashed-before) batch at a time
        common: dict[str, Any] = dict(concurrency=config.concurrency, retry=config.retry,
                                      ledger=self.ledger, seed=None, limiter=self.limiter,
                                      observer=self.metrics)
        self.engine: Engine
        if config.mode == "async":
            assert isinstance(sender, AsyncSender), "this sender has no async path"
            self.engine = AsyncEngine(sender, **common)
        else:
            assert isinstance(sender, Sender)
            # `warm`: the threads connect while this actor waits for the pool's first batch
            # (batching.warm_connections).
            self.engine = ThreadEngine(sender, warm=warm, **common)
        # Checked without the lock on every batch, taken only until the pool is up.
        self._pool_up = False
        self._pool_lock = threading.Lock()
        with contextlib.suppress(ray.exceptions.RayActorError):  # gone: the run is ending
            ray.get(coordinator.sender_up.remote(self.actor, config.actors))

    def _stop_requested(self) -> bool:
        """Asked from the batch's own call thread (every 0.25 s while it runs): a `ray.get` from
        a thread of our own crashed Ray 2.60's core worker when it overlapped actor teardown
        (a segfault in TaskCounter::UnsetMetricStatus), which would restart the actor."""
        try:
            return bool(ray.get(self.coordinator.is_stopping.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - the coordinator is gone: the run is ending, stop
            return True

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id")
        n = batch.num_rows
        if n == 0:
            return _summary(0, BatchCounts())
        if not self._pool_up:
            self._wait_for_pool()
        key = f"{ids[0].as_py()}:{ids[n - 1].as_py()}:{n}"
        if ray.get(self.coordinator.attempts.remote(key)) == 0:
            return self._begin(batch, key)
        # A worker died while this batch was running. Retried batches run one at a time per
        # actor, and an attempt counts only once the batch holds the lock: a healthy batch that
        # happened to share an actor with a poisoned one then crashes at most once more, and
        # finishes when it runs alone, while the poisoned one runs out of attempts.
        with self._retry_lock:
            return self._begin(batch, key)

    def _wait_for_pool(self) -> None:
        """Before this actor's first send: wait until every sender actor is up (bounded)."""
        with self._pool_lock:  # every call Ray Data has in flight here waits; one asks
            if not self._pool_up:
                # The coordinator gone: the run is ending, and the batch's next call to it
                # fails the batch.
                with contextlib.suppress(ray.exceptions.RayActorError):
                    ray.get(self.coordinator.wait_for_pool.remote(POOL_START_BOUND))
                self._pool_up = True

    def _begin(self, batch: pa.Table, key: str) -> pa.Table:
        attempt = ray.get(self.coordinator.begin_batch.remote(key))
        if attempt == NOT_STARTED:  # the run is stopping: leave the whole batch for the resume
            return _summary(batch.num_rows, BatchCounts(abandoned=batch.num_rows))
        try:
            return self._send(batch, attempt=attempt)
        finally:
            ray.get(self.coordinator.end_batch.remote())

    def _send(self, batch: pa.Table, *, attempt: int) -> pa.Table:
        ids = batch.column("id").to_pylist()
        parts = (batch.column(PART).to_pylist() if PART in batch.column_names
                 else [0] * len(ids))
        skip: set[int] = set()
        if attempt > 1:
            # What the dead worker recorded before dying is not sent again.
            skip = ledger.recorded_ids(self.run_dir, ids, parts)
        self.ledger.assign(ids, parts)  # each row's ledger partition
        try:
            if attempt > self.config.max_batch_attempts:
                return self._give_up(batch, skip, attempt)
            counts = self._run(messages.from_batch(batch, campaign=self.campaign,
                                                   domain=self.domain, fields=self.fields,
                                                   skip=skip))
        finally:
            try:
                self.ledger.flush()  # durable before Ray Data (or a stopping driver) counts it done
            finally:
                self.ledger.release(ids)  # only once its rows are written under their partition
        return _summary(batch.num_rows, counts, skipped=len(skip), crashed=int(attempt > 1))

    def _run(self, batch: list[messages.Message]) -> BatchCounts:
        """`engine.run`; when no other batch is under way here, the actor's work has run out
        (Ray Data keeps two batches in flight while it has any), so rate slots it holds go
        back to the schedule for the other actors instead of leaving a hole in the rate."""
        with self._calls_lock:
            self._calls += 1
        try:
            return self.engine.run(batch, should_stop=self._stop_requested)
        finally:
            if self.metrics is not None:
                self.metrics.flush()  # a finished batch shows in the metrics at Ray's next export
            with self._calls_lock:
                self._calls -= 1
                idle = self._calls == 0
            if idle:
                for limiter in (self.limiter, *self.relay_limiters.values()):
                    if limiter is not None:
                        limiter.give_back()

    def _give_up(self, batch: pa.Table, skip: set[int], attempt: int) -> pa.Table:
        reason = (f"worker process died {attempt - 1} times while sending this batch; "
                  "not tried again")
        now = time.time()
        counts = BatchCounts()
        for m in messages.from_batch(batch, campaign=self.campaign, domain=self.domain,
                                     fields=(), skip=skip):
            self.ledger.record(m.id, m.to, ledger.FAILED, 0, reason, None, now, None, m.message_id)
            counts.failed += 1
        self.ledger.flush()
        return _summary(batch.num_rows, counts, skipped=len(skip), crashed=1)

    def _close(self) -> None:
        """Flush the metrics and the ledger (every batch flushed its rows at its end already:
        nothing is left, as a rule); never raises, the process is ending."""
        try:
            if self.metrics is not None:
                self.metrics.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.ledger.close()
        except Exception:  # noqa: BLE001
            pass

    def _at_exit(self) -> None:
        self._close()
        gc.freeze()

    def __del__(self) -> None:  # the atexit registration keeps this actor's UDF alive till exit
        self._close()


def _limiter(schedule: Any, rate: float, concurrency: int) -> ratelimit.SlotLimiter:
    """This actor's client of a cluster-wide rate limit (a RateLimiter actor): the global one,
    or one relay's."""
    offset = ratelimit.estimate_offset(lambda: float(ray.get(schedule.now.remote())))
    # One request may cover every waiting worker, or one second of the whole rate.
    chunk = max(concurrency, math.ceil(rate))

    def grant(n: int, lead: float | None) -> ratelimit.Grant:
        slots, retry_at = ray.get(schedule.grant.remote(n, lead))
        return list(slots), float(retry_at)

    def release(slots: list[float]) -> None:
        ray.get(schedule.release.remote(slots))
    return ratelimit.SlotLimiter(grant, release=release, max_chunk=chunk, offset=offset)
