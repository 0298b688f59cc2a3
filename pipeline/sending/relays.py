"""Several relays: where each new SMTP connection goes, and what a failed attempt to open one
means for the send (no Ray; the senders in smtp.py do the I/O).

A `RelayPool` is shared by one sender's threads or coroutines (one pool per sender actor). It
holds each relay's settings (its TLS context, its password from the environment variable it
names, its connection cap, its rate limiter) and its health:

- a new connection goes to the healthy relay with the fewest of this sender's connections,
  ties taken in turn (round robin), skipping relays at their `max_connections`;
- a relay whose connection attempt fails (refused, reset, a connect timeout, TLS, a refusal of
  the greeting, EHLO, STARTTLS or AUTH such as a 421 or 4xx greeting), or whose fresh
  connection breaks before a message's data, leaves rotation for `backoff[0]` seconds; once
  that time is up one attempt (the probe) may connect to it again: when the probe connects the
  relay is back, when it fails the wait doubles, up to `backoff[1]`;
- a send whose connection attempt failed goes at once to another healthy relay, inside the
  same send call (nothing was written, so nothing can have been delivered: it is not an
  attempt); when no relay is left the send is transient, every relay's state in its error (a
  permanent refusal only when every relay refused permanently);
- with one relay there is nowhere else to go: it never leaves rotation, each attempt connects
  and the engine's retries pace them, as with one --smtp-host.

`preflight` checks every relay's settings on the driver, before Ray starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..config import Relay, SmtpConfig, TlsMode
from ..errors import UsageError
from .base import SendResult
from .wire import NotOffered, ReplyError, one_line, reply_result

__all__ = ["BACKOFF", "CONNECT_ERRORS", "Attempt", "Failover", "Limiter", "RelayPool", "RelayState",
           "connect_result", "connection_result", "env_password", "preflight", "tls_context"]
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, ReplyError, NotOffered)
BACKOFF = (1.0, 30.0)  # seconds out of rotation after a failure; doubled per failed probe up to


class Limiter(Protocol):
    """A relay's rate limit inside one actor (ratelimit.SlotLimiter, built by actors.py)."""

    def wait(self) -> None: ...
    async def await_turn(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...


def tls_context(tls: TlsMode, ca_file: str | None) -> ssl.SSLContext | None:
    if tls == "none":
        return None
    # Certificates are verified (hostname included); `ca_file` adds a CA to trust (a private
    # or test CA) on top of the system's.
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def connection_result(exc: BaseException, where: str) -> SendResult:
    detail = one_line(exc) or type(exc).__name__
    return SendResult("transient", f"{where}: {type(exc).__name__}: {detail}")


def connect_result(exc: BaseException, where: str = "connect") -> SendResult:
    """Opening a connection failed: a refusal (greeting, STARTTLS, AUTH), a missing extension
    (never sent anyway: permanent) or a connection error (refused, reset, timeout, TLS)."""
    if isinstance(exc, ReplyError):
        return reply_result(exc.code, exc.text, where)
    if isinstance(exc, NotOffered):
        return SendResult("permanent", f"{where}: {exc}")
    return connection_result(exc, where)


@dataclass(eq=False)
class RelayState:
    relay: Relay
    smtp: SmtpConfig  # the relay's settings in the shape the connections read
    context: ssl.SSLContext | None
    password: str | None
    limiter: Limiter | None
    live: int = 0  # this sender's connections to it, open or being opened
    down_until: float | None = None  # out of rotation until then; None: healthy
    backoff: float = 0.0
    probing: bool = False  # an attempt is trying it again
    error: str = ""  # why it left rotation
    opened: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return self.relay.name


@dataclass(frozen=True, slots=True)
class Attempt:
    """A connection attempt the pool has counted (`live`): end it with `connected` or `failed`."""

    relay: RelayState
    probe: bool


class Failover:
    """One send call's way through the relays: those whose connection failed, the last failure."""

    __slots__ = ("tried", "last")

    def __init__(self) -> None:
        self.tried: list[RelayState] = []
        self.last: SendResult | None = None


def env_password(relay: Relay) -> str | None:
    return os.environ.get(relay.password_env) if relay.user else None


class RelayPool:
    """The relays of one sender, shared by its threads (a lock) or its coroutines."""

    def __init__(self, smtp: SmtpConfig, *, password: Callable[[Relay], str | None] = env_password,
                 limiters: Mapping[str, Limiter] | None = None, max_connections: int | None = None,
                 backoff: tuple[float, float] = BACKOFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        limiters = limiters or {}
        self.relays = [
            RelayState(r, dataclasses.replace(smtp, host=r.host, port=r.port, tls=r.tls, user=r.user,
                                              password_env=r.password_env, relays=()),
                       tls_context(r.tls, smtp.ca_file), password(r), limiters.get(r.name))
            for r in smtp.effective_relays]
        self.rotation = len(self.relays) > 1
        self.max_connections = max_connections  # all relays together
        self.backoff = backoff
        self.live = 0
        self._clock = clock
        self._next = 0  # round robin among equals
        self._cv = threading.Condition()

    def state(self, name: str) -> RelayState:
        return next(r for r in self.relays if r.name == name)

    # -- choosing
    def pick(self, f: Failover, *, wait: float | None = None) -> Attempt | SendResult | None:
        """Where this send's next connection goes: an `Attempt`; a `SendResult` when no relay is
        left for it; None when every relay left is at its connection cap (with `wait`: block up
        to that many seconds for a connection to close instead, then a transient result)."""
        with self._cv:
            deadline: float | None = None
            while True:
                choice = self._choose(f)
                if choice is not None or wait is None:
                    return choice
                now = time.monotonic()
                deadline = now + wait if deadline is None else deadline
                if now >= deadline:
                    return SendResult("transient", "every relay is at its max_connections: "
                                      + self._describe())
                self._cv.wait(min(deadline - now, 0.25))  # probes also come due with time

    def _choose(self, f: Failover) -> Attempt | SendResult | None:
        if self.max_connections is not None and self.live >= self.max_connections:
            return None
        now = self._clock()
        n = len(self.relays)
        best: RelayState | None = None
        best_i, left = 0, False
        for k in range(n):
            i = (self._next + k) % n
            r = self.relays[i]
            if r in f.tried or (r.down_until is not None and (r.probing or now < r.down_until)):
                continue
            left = True
            if r.relay.max_connections is not None and r.live >= r.relay.max_connections:
                continue
            if best is None or r.live < best.live:
                best, best_i = r, i
        if best is None:
            return None if left else self._unavailable(f)
        self._next = (best_i + 1) % n
        probe = best.down_until is not None
        best.probing = best.probing or probe
        best.live += 1
        self.live += 1
        return Attempt(best, probe)

    def _unavailable(self, f: Failover) -> SendResult:
        last = f.last
        if last is not None and (not self.rotation or (
                last.status == "permanent" and len(f.tried) == len(self.relays))):
            return last
        return SendResult("transient", "no healthy relay: " + self._describe())

    def _describe(self) -> str:
        now = self._clock()
        out = []
        for r in self.relays:
            if r.down_until is None:
                state = f"{r.live} connections"
            elif r.probing:
                state = "being probed"
            else:
                state = f"out of rotation for {max(0.0, r.down_until - now):.1f} s more"
            out.append(f"{r.name} {state}" + (f" ({r.error})" if r.error else ""))
        return "; ".join(out)

    # -- what became of an attempt, and of a connection
    def where(self, r: RelayState) -> str:
        return f"connect to {r.name}" if self.rotation else "connect"

    def connected(self, a: Attempt) -> None:
        r = a.relay
        with self._cv:
            r.opened += 1
            if r.down_until is not None:  # the probe connected: back in rotation
                r.down_until, r.backoff, r.probing, r.error = None, 0.0, False, ""

    def failed(self, a: Attempt, exc: BaseException) -> SendResult:
        """The attempt did not connect: the relay leaves rotation; the send's result so far."""
        result = connect_result(exc, self.where(a.relay))
        with self._cv:
            self._release(a.relay)
            self._down(a.relay, a.probe, result)
        return result

    def lost(self, r: RelayState, result: SendResult) -> None:
        """A fresh connection to `r` broke before a message's data: as a failed attempt."""
        with self._cv:
            self._down(r, False, result)

    def released(self, r: RelayState) -> None:
        """A connection to `r` is closed (or an attempt given up without an answer)."""
        with self._cv:
            self._release(r)

    def _release(self, r: RelayState) -> None:
        r.live -= 1
        self.live -= 1
        self._cv.notify_all()

    def _down(self, r: RelayState, probe: bool, result: SendResult) -> None:
        r.failures += 1
        if not self.rotation:
            return
        if probe and r.probing:  # the probe failed: wait twice as long
            r.probing = False
            r.backoff = min(self.backoff[1], max(r.backoff, self.backoff[0]) * 2)
            r.down_until = self._clock() + r.backoff
        elif r.down_until is None:  # a healthy relay failed: out for the first wait
            r.backoff = self.backoff[0]
            r.down_until = self._clock() + r.backoff
        # else: an attempt begun before it left rotation; the relay is out already
        r.error = result.error or ""

    def cancel(self) -> None:
        """The run is stopping: wake every sender waiting for a relay's rate-limit slot."""
        for r in self.relays:
            if r.limiter is not None:
                r.limiter.cancel()


def preflight(smtp: SmtpConfig) -> None:
    """Driver-side checks before Ray starts (the actors read the passwords themselves)."""
    several = bool(smtp.relays)
    for r in smtp.effective_relays:
        who = f"relay {r.name} (user {r.user})" if several else f"--smtp-user {r.user}"
        if r.user and not os.environ.get(r.password_env):
            raise UsageError(f"{who}: set the password in ${r.password_env} (it is never taken "
                             "from a flag or a file)")
    if smtp.ca_file and not os.path.isfile(smtp.ca_file):
        raise UsageError(f"--smtp-ca-file {smtp.ca_file}: no such file")
    for r in smtp.effective_relays:
        if r.tls == "none" and r.user:
            raise UsageError(f"relay {r.name}: a user with tls none would send the password in "
                             "clear text; set tls to starttls or ssl" if several else
                             "--smtp-user with --smtp-tls none would send the password in clear "
                             "text; use --smtp-tls starttls or ssl")
