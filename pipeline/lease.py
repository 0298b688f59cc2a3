"""A campaign lease: two runs of the same campaign never send at once.

Overlapping cron jobs or two operators can start the same campaign twice; without a lease both
would read the same ledger and send the same emails. The lease lives in the campaign's run
directory (a local path, possibly on a shared filesystem, or ``s3://bucket/prefix``), so it works
wherever the run directory works, with no extra service.

Protocol. The only primitive it needs is "create this file if it does not exist", which a POSIX
filesystem (``link(2)``) and S3 (``PutObject`` with ``If-None-Match: *``) both guarantee
atomically. The lease is a series of epoch files ``<run_dir>/lease/<epoch:012d>.json``; the
holder is whoever created the highest epoch. Acquiring means creating epoch N+1 exclusively, and
is allowed only when epoch N is free: released by its holder, left by a process on this host that
no longer exists, or not heartbeated for longer than its ttl. The holder renews by rewriting its
own epoch file with a new ``heartbeat_at`` and then listing the directory: a higher epoch means
another run took over, and this run must stop (:class:`LeaseLost`).

Safety. A holder may send only while :attr:`Lease.valid_until` has not passed: the heartbeat it
last wrote plus ttl minus a margin (ttl/4). A taker waits until that same heartbeat plus the whole
ttl, so a holder that was paused (GC, swap, a stopped VM) learns from its own clock that it must
stop *before* anyone can take over. A renewal extends the lease only if it completed before the
previous ``valid_until``; a holder whose lease lapsed cannot trust that no taker is about to
create the next epoch on the strength of an old heartbeat, so instead of extending it takes a
fresh epoch through the same exclusive create a taker uses (and loses the lease if a taker got
there first). Assumption: the hosts' clocks agree to within the margin (2.5 s at the default ttl);
NTP keeps them far closer. Never delete the lease directory while a run is in progress.

Layout. This module owns the rules: when an epoch is free to take over (released, provably
gone, expired), :func:`read_holder`, and :class:`Lease` itself (acquire, renew, heartbeat,
release). pipeline/lease_record.py owns the record format and the public :class:`Holder`,
:class:`LeaseHeld` and :class:`LeaseLost` (re-exported here); pipeline/lease_store.py owns where
the epoch files live and how they are created exclusively (local and S3 stores, naming, boto3).

No Ray, no printing: this module only raises exceptions, and the caller decides what to tell
whom.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType

from .errors import BulkmailError, UsageError
from .lease_record import Holder, LeaseHeld, LeaseLost, _parse_record, _Record, _record_json
from .lease_store import LEASE_DIR, Store, epoch_name, open_store

__all__ = ["DEFAULT_TTL", "HEARTBEAT_FRACTION", "MARGIN_FRACTION", "Holder", "Lease", "LeaseHeld",
           "LeaseLost", "read_holder"]

DEFAULT_TTL = 10.0
"""Seconds a lease outlives its last heartbeat; the heartbeat runs every ttl/4."""

HEARTBEAT_FRACTION = 0.25
"""Heartbeat interval as a fraction of the ttl: two beats may fail before the lease lapses."""

MARGIN_FRACTION = 0.25
"""How long before a taker may take over the holder stops trusting its lease (fraction of ttl).

It absorbs clock skew between hosts: the design assumes clocks agree to within this margin.
"""

_ACQUIRE_ATTEMPTS = 8   # rounds of "read the top epoch, apply the rules, create the next one"
_KEEP_BEHIND = 2        # a taker of epoch N+1 keeps N and N-1 as history and deletes older ones


# --- the rules ------------------------------------------------------------------------------

def _pid_scope() -> str:
    """This kernel boot and pid namespace (Linux), "" where unknown.

    Two processes with the same scope number their pids alike, so one can tell whether the other
    is still alive. The boot id is shared by containers on one kernel, the namespace is not.
    """
    parts = []
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError, AttributeError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _provably_gone(record: _Record) -> bool:
    """The holder ran on this host, in our pid numbering, and its process no longer exists."""
    holder = record.holder
    if os.name != "posix" or holder.pid <= 0:
        return False   # os.kill(pid, 0) is not a probe on Windows; pid 0 would be our group
    if holder.host != socket.gethostname() or record.pid_scope != _pid_scope():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:   # PermissionError: alive, another user's
        return False
    return False


def _free(record: _Record, now: float) -> bool:
    """Whether a taker may create the next epoch over this one (see the module docstring)."""
    holder = record.holder
    return holder.released or _provably_gone(record) or now - holder.heartbeat_at > holder.ttl_s


def _read_record(store: Store, epoch: int) -> _Record | None:
    data = store.read(epoch)
    where = f"{store.where}/{LEASE_DIR}/{epoch_name(epoch)}"
    return None if data is None else _parse_record(data, where)


def read_holder(run_dir: str) -> Holder | None:
    """The current (highest-epoch) holder of the campaign's lease; None if it was never leased.

    For ``bulkmail status``: a released or expired holder is returned as well, so the caller can
    say who ran last; ``holder.released`` and ``holder.expires_in(now)`` tell it apart.
    """
    store = open_store(run_dir)
    for _ in range(_ACQUIRE_ATTEMPTS):
        epochs = store.epochs()
        if not epochs:
            return None
        record = _read_record(store, epochs[-1])
        if record is not None:
            return record.holder
        # The top epoch vanished between list and read (pruned after two takeovers): list again.
    raise BulkmailError(f"the lease in {store.where} changed too quickly to be read")


# --- the lease ------------------------------------------------------------------------------

class Lease:
    """The right to send one campaign, held by this run; renewed by a heartbeat.

    Create one with :meth:`acquire`. Before each send (or batch of sends) check :meth:`valid`:
    it turns False on its own, from this process's clock, before any other run can take over.
    """

    def __init__(self, *, store: Store, run_dir: str, run_id: str, ttl: float,
                 clock: Callable[[], float], epoch: int, started_at: float, heartbeat_at: float,
                 token: str, pid_scope: str) -> None:
        self._store = store
        self._run_dir = run_dir
        self._run_id = run_id
        self._ttl = ttl
        self._clock = clock
        self._epoch = epoch
        self._started_at = started_at
        self._token = token
        self._pid_scope = pid_scope
        self._valid_until = heartbeat_at + ttl - self.margin
        self._lost = False
        self._released = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring ---------------------------------------------------------------------------

    @classmethod
    def acquire(cls, run_dir: str, *, run_id: str, ttl: float = DEFAULT_TTL,
                clock: Callable[[], float] = time.time) -> Lease:
        """Take the campaign's lease or raise :class:`LeaseHeld` naming who has it.

        Creates epoch N+1 when epoch N is released, provably gone or expired. When another run
        creates N+1 first (a race), the rules are applied again to the winner, which is alive,
        so the loser gets LeaseHeld: of any number of simultaneous starts exactly one proceeds.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise UsageError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
        store = open_store(run_dir)
        store.prepare()
        token = uuid.uuid4().hex
        scope = _pid_scope()
        last: Holder | None = None
        for _ in range(_ACQUIRE_ATTEMPTS):
            epochs = store.epochs()
            top = epochs[-1] if epochs else 0
            if top:
                record = _read_record(store, top)
                if record is None:
                    continue   # pruned between list and read: a takeover just happened; look again
                now = clock()
                if not _free(record, now):
                    raise LeaseHeld.for_holder(run_dir, record.holder, now)
                last = record.holder
            started = clock()
            lease = cls(store=store, run_dir=run_dir, run_id=run_id, ttl=ttl, clock=clock,
                        epoch=top + 1, started_at=started, heartbeat_at=started, token=token,
                        pid_scope=scope)
            if lease._create_epoch(top + 1, started):
                lease._prune(top + 1)
                return lease
            # Someone else created top+1 first: re-read and judge the winner.
        if last is not None:
            raise LeaseHeld.for_holder(run_dir, last, clock())
        raise BulkmailError(f"could not acquire the lease in {store.where}: it changed hands "
                            f"{_ACQUIRE_ATTEMPTS} times while trying")

    def _holder(self, *, epoch: int, heartbeat_at: float, released: bool) -> Holder:
        return Holder(host=socket.gethostname(), pid=os.getpid(), run_id=self._run_id,
                      started_at=self._started_at, heartbeat_at=heartbeat_at, ttl_s=self._ttl,
                      epoch=epoch, released=released)

    def _data(self, *, epoch: int, heartbeat_at: float, released: bool) -> bytes:
        holder = self._holder(epoch=epoch, heartbeat_at=heartbeat_at, released=released)
        return _record_json(holder, token=self._token, pid_scope=self._pid_scope)

    def _create_epoch(self, epoch: int, heartbeat_at: float) -> bool:
        """Exclusively create `epoch` as ours; True if we did (even if the reply got lost)."""
        if self._store.create(epoch, self._data(epoch=epoch, heartbeat_at=heartbeat_at,
                                                released=False)):
            return True
        # A retried create whose first attempt succeeded finds our own file: that is a win.
        try:
            record = _read_record(self._store, epoch)
        except UsageError:
            return False
        return record is not None and record.token == self._token

    def _prune(self, created: int) -> None:
        """Drop epochs older than the two before `created`; best effort, they are only history."""
        with contextlib.suppress(Exception):
            self._store.delete_below(created - _KEEP_BEHIND)

    # -- state -------------------------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return self._run_dir

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def margin(self) -> float:
        """How long before a taker could take over this holder stops trusting its lease."""
        return self._ttl * MARGIN_FRACTION

    @property
    def heartbeat_interval(self) -> float:
        return self._ttl * HEARTBEAT_FRACTION

    @property
    def epoch(self) -> int:
        """The epoch this run holds; it grows if a lapsed lease had to be taken afresh."""
        return self._epoch

    @property
    def valid_until(self) -> float:
        """Clock time after which this run must not send: last heartbeat + ttl - margin."""
        return self._valid_until

    def valid(self) -> bool:
        """Whether this run may send right now: held, not lost, not released, not lapsed."""
        return not self._lost and not self._released and self._clock() < self._valid_until

    # -- renewing ----------------------------------------------------------------------------

    def renew(self) -> None:
        """Heartbeat: rewrite our epoch file, then check nobody created a higher epoch.

        Raises LeaseLost if another run took over. Writing before checking means a taker that
        created the next epoch is seen at the latest by the next renewal. I/O errors propagate
        and leave the lease running toward expiry, unchanged. A renewal that cannot finish
        before ``valid_until`` (this process was paused, or renewals kept failing) does not
        extend the lapsed epoch but takes the next one exclusively, so :attr:`epoch` grows.
        """
        with self._lock:
            if self._released:
                raise LeaseLost(f"the lease on {self._run_dir} was released by this run")
            if self._lost:
                raise LeaseLost(f"the lease on {self._run_dir} was taken over by another run")
            start = self._clock()
            in_time = start < self._valid_until
            if in_time:
                self._store.overwrite(self._epoch, self._data(
                    epoch=self._epoch, heartbeat_at=start, released=False))
            epochs = self._store.epochs()
            top = epochs[-1] if epochs else 0
            if top > self._epoch:
                self._lose(top)
            if in_time and self._clock() < self._valid_until:
                self._valid_until = start + self._ttl - self.margin
                return
            # The lease lapsed before this renewal finished. A taker may have judged it expired
            # from an older heartbeat and be about to create the next epoch, so extending ours
            # would be unsafe: take the next epoch exclusively instead, as a taker would.
            fresh = self._clock()
            if self._create_epoch(self._epoch + 1, fresh):
                self._epoch += 1
                self._valid_until = fresh + self._ttl - self.margin
                self._prune(self._epoch)
                return
            self._lose(self._epoch + 1)

    def _lose(self, epoch: int) -> None:
        self._lost = True
        taker: Holder | None = None
        with contextlib.suppress(Exception):
            record = _read_record(self._store, epoch)
            taker = record.holder if record else None
        by = f" by {taker.describe(self._clock())}" if taker else ""
        raise LeaseLost(f"the lease on {self._run_dir} was taken over{by} (epoch {epoch}, this "
                        f"run held {self._epoch}); this run must stop sending", taker)

    def start_heartbeat(self, *, on_lost: Callable[[BaseException], None],
                        on_renewed: Callable[[float], None] | None = None) -> None:
        """Renew every ttl/4 on a daemon thread until :meth:`release`.

        On LeaseLost calls ``on_lost`` once and stops. Any other error (a network blip, a full
        disk) is retried at the next beat: meanwhile the lease runs toward expiry and
        :meth:`valid` turns False by itself, so no send happens on a lease that cannot be
        renewed. ``on_renewed`` gets the new ``valid_until`` after each successful renewal;
        exceptions from it are ignored, so a bad callback cannot stop the heartbeat.
        """
        with self._lock:
            if self._released or self._lost:
                raise LeaseLost(f"the lease on {self._run_dir} is no longer held")
            if self._thread is not None:
                raise BulkmailError("the lease heartbeat is already running")
            self._thread = threading.Thread(target=self._beat, args=(on_lost, on_renewed),
                                            name=f"lease-heartbeat-{self._epoch}", daemon=True)
            self._thread.start()

    def _beat(self, on_lost: Callable[[BaseException], None],
              on_renewed: Callable[[float], None] | None) -> None:
        interval = self.heartbeat_interval
        due = time.monotonic() + interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + interval, time.monotonic() + interval / 2)   # late: no burst of beats
            try:
                self.renew()
            except LeaseLost as e:
                if not self._stop.is_set():
                    on_lost(e)
                return
            except Exception:
                continue   # transient; the next beat tries again
            if on_renewed is not None and not self._stop.is_set():
                with contextlib.suppress(Exception):
                    on_renewed(self._valid_until)

    # -- releasing ---------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and mark our epoch released, so the next run starts at once.

        Only our own epoch file is ever written, and not even that once a higher epoch exists:
        a taker's lease is never touched. Safe to call twice. If the write fails the error
        propagates, and the lease simply expires ttl after its last heartbeat.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(self._ttl, 10.0))
        with self._lock:
            if self._released or self._lost:
                return
            self._released = True   # first: whatever happens below, this run sends no more
            epochs = self._store.epochs()
            if epochs and epochs[-1] > self._epoch:
                self._lost = True
                return
            self._store.overwrite(self._epoch, self._data(
                epoch=self._epoch, heartbeat_at=self._clock(), released=True))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # With an exception already on its way out, a failing release must not replace it: the
        # lease then expires on its own.
        if exc is None:
            self.release()
        else:
            with contextlib.suppress(Exception):
                self.release()
