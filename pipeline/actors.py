"""The Ray side of sending: the per-run coordinator actor and the batch UDF run by the pool.

`SendBatches` is a Ray Data callable class: setup in `__init__` (sender, engine, ledger
writer), work in `__call__(batch)`. It is handed to `map_batches` with an ActorPoolStrategy.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from . import ledger, ratelimit
from .config import SendConfig
from .engine import AsyncEngine, BatchCounts, Engine, ThreadEngine
from .messages import Message, id_domain
from .senders import AsyncSender, Sender, make_sender

SUMMARY_SCHEMA = pa.schema([
    ("rows", pa.int64()), ("sent", pa.int64()), ("failed", pa.int64()),
    ("abandoned", pa.int64()), ("skipped", pa.int64()), ("attempts", pa.int64()),
    ("retries", pa.int64()), ("crashed", pa.int64()), ("finished_at", pa.float64()),
])


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Per-run shared state the sender actors consult: batch attempt counts and the stop flag.

    It asks for no CPU and is pinned to the driver's node, so it lives exactly as long as the run.
    """

    def __init__(self) -> None:
        self._attempts: dict[str, int] = {}
        self._stopping = False

    def begin_batch(self, key: str) -> int:
        """Count an attempt at a batch as it starts running. Above 1: a worker died running it."""
        n = self._attempts.get(key, 0) + 1
        self._attempts[key] = n
        return n

    def attempts(self, key: str) -> int:
        """How often a batch has started running (0: never, this is its first delivery)."""
        return self._attempts.get(key, 0)

    def stop(self) -> None:
        self._stopping = True

    def is_stopping(self) -> bool:
        return self._stopping

    def crashed_batches(self) -> int:
        return sum(1 for n in self._attempts.values() if n > 1)


# The global rate limit's one authority (ratelimit.py). Pinned to the driver's node by the
# caller, like the Coordinator, and never restarted: its state is the schedule itself.
RateLimiter = ray.remote(num_cpus=0, max_restarts=0)(ratelimit.SlotSchedule)


def _summary(rows: int, counts: BatchCounts, skipped: int = 0, crashed: int = 0) -> pa.Table:
    return pa.table({
        "rows": [rows], "sent": [counts.sent], "failed": [counts.failed],
        "abandoned": [counts.abandoned], "skipped": [skipped], "attempts": [counts.attempts],
        "retries": [counts.retries], "crashed": [crashed], "finished_at": [time.time()],
    }, schema=SUMMARY_SCHEMA)


class _Columns:
    """A batch's template columns, each turned into Python values only when first read: the
    fake sender never reads them, and SMTP reads every one once."""

    __slots__ = ("_batch", "names", "_lists")

    def __init__(self, batch: pa.Table, names: tuple[str, ...]) -> None:
        self._batch = batch
        self.names = names
        self._lists: dict[str, list[Any]] = {}

    def get(self, name: str, i: int) -> Any:
        values = self._lists.get(name)
        if values is None:  # two threads may both convert: same values, no harm
            values = self._lists[name] = self._batch.column(name).to_pylist()
        return values[i]


class _RowFields(Mapping[str, Any]):
    """One recipient's template fields (Message.fields), read from its batch's columns."""

    __slots__ = ("_cols", "_i")

    def __init__(self, cols: _Columns, i: int) -> None:
        self._cols = cols
        self._i = i

    def __getitem__(self, name: str) -> Any:
        if name not in self._cols.names:
            raise KeyError(name)
        return self._cols.get(name, self._i)

    def __iter__(self) -> Iterator[str]:
        return iter(self._cols.names)

    def __len__(self) -> int:
        return len(self._cols.names)


class SendBatches:
    """Sends each batch of recipients through one long-lived engine per actor."""

    def __init__(self, *, run_dir: str, campaign: str, run_id: str, config: SendConfig,
                 coordinator: Any, fields: tuple[str, ...], rate_limiter: Any = None) -> None:
        # The cyclic GC, not sending, was half of an async actor's CPU: asyncio allocates a few
        # container objects per email (future, timer handle, coroutine), so at the default
        # threshold (700) a young collection ran every ~100 emails and the older generations
        # (25,000 worker coroutines, the queued messages) were walked again and again: 18.6 µs
        # of CPU per email, 9.8 µs with these thresholds (in-process, 25,000 workers at 0.5 s).
        # Refcounting frees nearly everything, so collecting rarely costs little memory. The
        # actor's process does nothing but send.
        gc.set_threshold(50_000, 20, 100)
        ctx = ray.get_runtime_context()
        # The pool names its actors (campaign.py); the id's leading hex is unique, its tail is
        # the job id.
        name = ctx.get_actor_name() if hasattr(ctx, "get_actor_name") else None
        self.actor = name or f"sender-{(ctx.get_actor_id() or os.urandom(6).hex())[:12]}"
        self.node = ctx.get_node_id() or "local"
        self.run_dir = run_dir
        self.campaign = campaign
        self.config = config
        self.coordinator = coordinator
        self.fields = fields
        self.domain = id_domain(config.message.from_addr)
        self.ledger = ledger.LedgerWriter(run_dir, writer=self.actor, node=self.node, run=run_id,
                                          flush_seconds=config.flush_seconds)
        sender = make_sender(config)
        from .metrics import SendMetrics
        self.metrics = (SendMetrics(campaign=campaign, actor=self.actor, node=self.node)
                        if config.metrics else None)
        self.limiter = _limiter(rate_limiter, config) if rate_limiter is not None else None
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
            self.engine = ThreadEngine(sender, **common)

    def _stop_requested(self) -> bool:
        """Asked from the batch's own call thread (every 0.25 s while it runs): a `ray.get` from
        a thread of our own crashed Ray 2.60's core worker when it overlapped actor teardown
        (a segfault in TaskCounter::UnsetMetricStatus), which would restart the actor."""
        try:
            return bool(ray.get(self.coordinator.is_stopping.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - the coordinator is gone: the run is ending anyway
            return False

    def _messages(self, batch: pa.Table, skip: set[int]) -> list[Message]:
        # Vectorised over the batch: building each Message with a per-row f-string and a
        # fields dict was a third of an actor's CPU at 60,000 emails/s (py-spy).
        if skip:
            batch = batch.filter(pc.invert(pc.is_in(batch.column("id"),
                                                    value_set=pa.array(sorted(skip), pa.int64()))))
        id_col = batch.column("id")
        # The same text as messages.message_id(campaign, id, domain), built by Arrow.
        mids = pc.binary_join_element_wise(f"<{self.campaign}.", pc.cast(id_col, pa.string()),
                                           f"@{self.domain}>", "").to_pylist()
        columns = _Columns(batch, tuple(f for f in self.fields if f in batch.column_names))
        return list(map(Message, id_col.to_pylist(), batch.column("email").to_pylist(), mids,
                        map(_RowFields, itertools.repeat(columns), range(batch.num_rows))))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id")
        n = batch.num_rows
        if n == 0:
            return _summary(0, BatchCounts())
        key = f"{ids[0].as_py()}:{ids[n - 1].as_py()}:{n}"
        if ray.get(self.coordinator.attempts.remote(key)) == 0:
            ray.get(self.coordinator.begin_batch.remote(key))
            return self._send(batch, key, attempt=1)
        # A worker died while this batch was running. Retried batches run one at a time per
        # actor, and an attempt counts only once the batch holds the lock: a healthy batch that
        # happened to share an actor with a poisoned one then crashes at most once more, and
        # finishes when it runs alone, while the poisoned one runs out of attempts.
        with self._retry_lock:
            attempt = ray.get(self.coordinator.begin_batch.remote(key))
            return self._send(batch, key, attempt=attempt)

    def _send(self, batch: pa.Table, key: str, *, attempt: int) -> pa.Table:
        skip: set[int] = set()
        if attempt > 1:
            # What the dead worker recorded before dying is not sent again.
            skip = ledger.recorded_ids(self.run_dir, batch.column("id").to_pylist())
        if attempt > self.config.max_batch_attempts:
            return self._give_up(batch, skip, attempt)
        messages = self._messages(batch, skip)
        counts = self._run(messages)
        self.ledger.flush()  # durable before Ray Data counts the batch as done
        return _summary(batch.num_rows, counts, skipped=len(skip), crashed=int(attempt > 1))

    def _run(self, messages: list[Message]) -> BatchCounts:
        """`engine.run`; when no other batch is under way here, the actor's work has run out
        (Ray Data keeps two batches in flight while it has any), so rate slots it holds go
        back to the schedule for the other actors instead of leaving a hole in the rate."""
        with self._calls_lock:
            self._calls += 1
        try:
            return self.engine.run(messages, should_stop=self._stop_requested)
        finally:
            if self.metrics is not None:
                self.metrics.flush()  # a finished batch shows in the metrics at Ray's next export
            with self._calls_lock:
                self._calls -= 1
                idle = self._calls == 0
            if idle and self.limiter is not None:
                self.limiter.give_back()

    def _give_up(self, batch: pa.Table, skip: set[int], attempt: int) -> pa.Table:
        reason = (f"worker process died {attempt - 1} times while sending this batch; "
                  "not tried again")
        now = time.time()
        counts = BatchCounts()
        for m in self._messages(batch, skip):
            self.ledger.record(m.id, m.to, ledger.FAILED, 0, reason, None, now, None, m.message_id)
            counts.failed += 1
        self.ledger.flush()
        return _summary(batch.num_rows, counts, skipped=len(skip), crashed=1)

    def __del__(self) -> None:
        try:
            if self.metrics is not None:
                self.metrics.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.ledger.close()
        except Exception:  # noqa: BLE001
            pass


def _limiter(schedule: Any, config: SendConfig) -> ratelimit.SlotLimiter:
    """This actor's client of the global rate limit (the RateLimiter actor)."""
    assert config.rate is not None
    offset = ratelimit.estimate_offset(lambda: float(ray.get(schedule.now.remote())))
    # One request may cover every waiting worker, or one second of the whole rate.
    chunk = max(config.concurrency, math.ceil(config.rate))

    def grant(n: int) -> ratelimit.Grant:
        slots, retry_at = ray.get(schedule.grant.remote(n))
        return list(slots), float(retry_at)

    def release(slots: list[float]) -> None:
        ray.get(schedule.release.remote(slots))
    return ratelimit.SlotLimiter(grant, release=release, max_chunk=chunk, offset=offset)
