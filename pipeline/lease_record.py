"""What a campaign lease file says (pipeline/lease.py): the holder, its record, the exceptions.

This module owns the record format of an epoch file (JSON, parsed strictly) and the public
:class:`Holder`, :class:`LeaseHeld` and :class:`LeaseLost`, which pipeline/lease.py re-exports.
When a record may be taken over, and the Lease that writes them, live in pipeline/lease.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from .errors import BulkmailError, UsageError

# --- what a lease file says -----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Holder:
    """Who holds (or last held) a campaign's lease, as recorded in the highest epoch file."""

    host: str
    pid: int
    run_id: str
    started_at: float
    heartbeat_at: float
    ttl_s: float
    epoch: int
    released: bool

    def expires_in(self, now: float) -> float:
        """Seconds until a taker may take over on expiry (negative once expired).

        Measured from the last heartbeat with the holder's own ttl, as takers do.
        """
        return self.heartbeat_at + self.ttl_s - now

    def describe(self, now: float | None = None) -> str:
        """One human line: which run, where, since when, how fresh; for messages and status."""
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        age = now - self.heartbeat_at
        beat = (f"last heartbeat {age:.1f} s ago" if age >= 0
                else f"last heartbeat {-age:.1f} s in the future (clock skew)")
        text = f"run {self.run_id} (pid {self.pid} on host {self.host}), started {started}, {beat}"
        return f"{text}, released" if self.released else text


@dataclass(frozen=True, kw_only=True)
class _Record:
    """A parsed lease file: the public :class:`Holder` plus the fields only this module needs.

    ``token`` is unique per acquisition, so a create whose reply was lost (an S3 retry, an NFS
    retransmission answering EEXIST) can still be recognised as our own. ``pid_scope`` names the
    kernel boot and pid namespace, so "same host" means "same pid numbering": a container sharing
    the host's name but not its pids never declares a live holder dead.
    """

    holder: Holder
    token: str
    pid_scope: str


def _record_json(holder: Holder, *, token: str, pid_scope: str) -> bytes:
    body: dict[str, Any] = {
        "host": holder.host, "pid": holder.pid, "run_id": holder.run_id,
        "started_at": holder.started_at, "heartbeat_at": holder.heartbeat_at,
        "ttl_s": holder.ttl_s, "epoch": holder.epoch, "released": holder.released,
        "token": token, "pid_scope": pid_scope,
    }
    return (json.dumps(body, indent=1) + "\n").encode()


def _parse_record(data: bytes, where: str) -> _Record:
    try:
        raw = json.loads(data.decode())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        number = (int, float)
        checks: dict[str, type | tuple[type, ...]] = {
            "host": str, "pid": int, "run_id": str, "started_at": number, "heartbeat_at": number,
            "ttl_s": number, "epoch": int, "released": bool}
        for key, kind in checks.items():
            value = raw.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"field {key!r} missing or of the wrong type")
        holder = Holder(host=raw["host"], pid=raw["pid"], run_id=raw["run_id"],
                        started_at=float(raw["started_at"]),
                        heartbeat_at=float(raw["heartbeat_at"]), ttl_s=float(raw["ttl_s"]),
                        epoch=raw["epoch"], released=raw["released"])
        return _Record(holder=holder, token=str(raw.get("token", "")),
                       pid_scope=str(raw.get("pid_scope", "")))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"lease file {where} is not a valid lease record ({e}); if no run of "
                         f"this campaign is in progress, delete it") from None


# --- exceptions -----------------------------------------------------------------------------

class LeaseHeld(UsageError):
    """Another run holds the campaign's lease; this run has not sent anything."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder

    def __reduce__(self) -> tuple[Any, ...]:   # picklable, holder included (Ray, multiprocessing)
        return (type(self), (str(self), self.holder))

    @classmethod
    def for_holder(cls, run_dir: str, holder: Holder, now: float) -> LeaseHeld:
        wait = max(0, math.ceil(holder.expires_in(now)))
        return cls(f"campaign {run_dir} is already running: its lease is held by "
                   f"{holder.describe(now)}; wait for it to finish, stop it (Ctrl-C in its "
                   f"terminal, or kill {holder.pid} on {holder.host}), or, if it died on another "
                   f"host, wait up to {wait} s for its lease to expire", holder)


class LeaseLost(BulkmailError):
    """Another run took over the lease (or this run released it): this run must stop sending."""

    def __init__(self, message: str, taker: Holder | None = None) -> None:
        super().__init__(message)
        self.taker = taker

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.taker))
