"""Real SMTP senders on bulkmail's own client (wire.py): `SmtpSender` (a blocking connection per
sending thread, blocking.SyncConnection; with PIPELINING a thread's next message begins in the
same write as this one's data, `send_then`) and `AsyncSmtpSender` (`AsyncConnection`s on the
event loop, each driven by a pump of its own, pump.py, which pipelines the same way). Each opens
its connections through a `relays.RelayPool`, which chooses among several relays and takes a
failing one out of rotation.

Connection discipline, the same in both:
- a connection carries up to `max_per_connection` messages (an RSET before each reuse only for
  lock-step servers: wire.Session.lockstep_rset), then is closed with QUIT;
- a failed connection attempt goes at once to another healthy relay, in the same send
  (relays.py); with one relay, the failure is the send's transient (or permanent) result;
- a connection that broke before a message's data was written (an idle one the server dropped,
  or one closed after answering the data before, its commands in that write) cannot have
  delivered it: it goes out at once on a new connection (`reconnects`), on another relay if a
  fresh connection broke; one that broke after the data fails that message only, as transient
  (the engine retries it after a backoff), and is thrown away;
- a relay with a `rate` is paced right before each transaction, by a slot of its cluster-wide
  schedule (its limiter); a limiter cancelled by a stop answers `ABANDONED` (not an attempt);
- replies: 4xx transient, 5xx permanent, the server's text is the error; a 421 also closes.

The password is read inside the sender actor, from the variable each relay names (`password_env`):
never in a config, a task argument, the ledger, the report or a log; no error quotes the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Mapping

from ..compose import Composer, Envelope
from ..config import SendConfig, SmtpConfig
from ..messages import Message
from .aio_connection import AsyncConnection, WriteBatch, quit_all
from .base import ABANDONED, SendResult
from .blocking import Ahead, SyncConnection
from .pump import Call, Calls, Pump, Source, wake_one
from .relays import (
    CONNECT_ERRORS,
    Attempt,
    Failover,
    Limiter,
    RelayPool,
    RelayState,
    connection_result,
    preflight,
    tls_context,
)
from .smtp_common import _Counters
from .wire import ConnectionLost, Flow, Step, reply_result

__all__ = ["AsyncSmtpSender", "SmtpSender", "SyncConnection", "connection_result", "make_smtp_sender",
           "preflight", "reply_result", "tls_context"]


class SmtpSender(_Counters):
    """Thread-safe: each sending thread keeps its own connection (`threading.local`)."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None, limiters: Mapping[str, Limiter] | None = None,
                 pool: RelayPool | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname,
                         limiters=limiters, pool=pool, max_connections=None)
        self._local = threading.local()
        self._all: set[SyncConnection] = set()
        self._closed = False

    def _conn(self) -> SyncConnection | None:
        """This thread's connection."""
        conn: SyncConnection | None = getattr(self._local, "conn", None)
        return conn

    def _drop(self, conn: SyncConnection, *, lost: bool) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            mine = conn in self._all
            self._all.discard(conn)
        if lost:
            self.reconnected()
        conn.close()  # QUIT first if the connection is still usable
        if mine:
            self.pool.released(conn.relay)

    def _open(self, f: Failover, *, wait: float | None) -> SyncConnection | SendResult | None:
        """A new connection for this thread, on the relay the pool chooses, failing over; None
        when every relay is at its max_connections (only without `wait`: RelayPool.pick)."""
        while True:
            a = self.pool.pick(f, wait=wait)
            if not isinstance(a, Attempt):
                return a
            r = a.relay
            try:
                conn = SyncConnection.open(r.smtp, ehlo=self._ehlo, context=r.context,
                                           password=r.password)
            except CONNECT_ERRORS as exc:
                f.last = self.pool.failed(a, exc)
                f.tried.append(r)
                continue
            except BaseException:
                self.pool.released(r)
                raise
            self.pool.connected(a)
            self.opened()
            conn.relay = r
            with self._lock:
                if not (closed := self._closed):
                    self._all.add(conn)
            if closed:  # close() came while this thread connected (warming): not left open
                conn.close()
                self.pool.released(r)
                return ABANDONED
            self._local.conn = conn
            return conn

    def warm(self) -> None:
        """Open this thread's connection ahead of its first message (base.WarmingSender).
        Nothing reaches the ledger: relays at their max_connections are left for the first
        message, and one that refuses is down for it, as a send would have found."""
        if self._conn() is None:
            with contextlib.suppress(Exception):  # TLS, AUTH: the first message meets it
                self._open(Failover(), wait=None)

    def send(self, message: Message) -> SendResult:
        env = self._envelope(message)
        return env if isinstance(env, SendResult) else self.send_envelope(env)

    def send_then(self, message: Message, upcoming: Callable[[], Message | None]) -> SendResult:
        """`send`, chained (base.ChainingSender): with PIPELINING, the next message from
        `upcoming` begins in the same write as this one's data. An ahead message whose
        connection broke or closed before its data goes out at once, fresh, as `send` would."""
        ahead: Ahead | None = getattr(self._local, "ahead", None)
        self._local.ahead = None
        if ahead is not None and ahead.message is message and ahead.result is not None:
            return ahead.result
        if ahead is not None and ahead.message is not message:  # not to go on: unusable
            if ahead.conn is not None and ahead.conn is self._conn():
                self._drop(ahead.conn, lost=True)
            ahead = None
        env = None if ahead is not None else self._envelope(message)
        if isinstance(env, SendResult):
            return env
        try:
            if ahead is not None:
                if (result := self._go_on(ahead, upcoming)) is not None:
                    return result
                env = self._envelope(message)  # broken before its data: fresh, at once
                if isinstance(env, SendResult):
                    return env
            assert env is not None
            return self.send_envelope(env, upcoming)
        except Exception:
            # A bug midway may leave replies unread on the connection: never read them as
            # another message's. A message begun on it had no data written: it goes fresh.
            if (conn := self._conn()) is not None:
                self._drop(conn, lost=True)
            self._local.ahead = None
            raise

    def _go_on(self, ahead: Ahead, upcoming: Callable[[], Message | None]) -> SendResult | None:
        conn, current = ahead.conn, self._conn()
        if conn is None or conn is not current or not conn.usable:
            if conn is not None and conn is current:  # a 421, say: the server is closing it
                self._drop(conn, lost=True)
            return None  # broken or closed before its data: sent fresh
        assert ahead.flow is not None
        try:
            result = conn.go_on(ahead.flow, ahead.n, self._then(conn, upcoming))
        except ConnectionLost as lost:
            self._drop(conn, lost=True)
            return None if lost.retry_safe else connection_result(lost.cause, "connection lost")
        if not conn.usable:  # 421
            self._drop(conn, lost=True)
        return result

    def _then(self, conn: SyncConnection,
              upcoming: Callable[[], Message | None] | None) -> Callable[[], bytes]:
        """What goes out with a message's data on `conn`: the next message's commands, when
        the server pipelines and nothing paces this relay's transactions one by one."""
        if upcoming is None or not conn.session.caps.pipelining or conn.relay.limiter is not None:
            return bytes

        def then() -> bytes:
            if not conn.usable or conn.session.sent >= self.smtp.max_per_connection:
                return b""
            message = upcoming()
            if message is None:
                return b""
            begun: tuple[Flow, Step] | SendResult
            try:  # as the pumps do (pump.py): a bug here fails this message only
                env = self._envelope(message)
                begun = env if isinstance(env, SendResult) else conn.begin(env)
            except Exception as exc:  # noqa: BLE001 - nothing of it written
                begun = SendResult("permanent", f"message not built: {type(exc).__name__}: {exc}")
            if isinstance(begun, SendResult):
                self._local.ahead = Ahead(message, result=begun)
                return b""
            flow, (out, n) = begun
            self._local.ahead = Ahead(message, conn=conn, flow=flow, n=n)
            return out
        return then

    def send_envelope(self, env: Envelope,
                      upcoming: Callable[[], Message | None] | None = None) -> SendResult:
        f = Failover()
        retried = False
        while True:
            conn: SyncConnection | None = getattr(self._local, "conn", None)
            if conn is not None and conn.session.sent >= self.smtp.max_per_connection:
                self._drop(conn, lost=False)
                conn = None
            # Not opened by this send (used before, or by `warm`): the server may have dropped it
            # since, so a break before the data sends again at once and does not blame the relay.
            reused = conn is not None
            if conn is None:
                opened = self._open(f, wait=self.smtp.timeout)
                assert opened is not None  # with `wait`, pick never answers None
                if isinstance(opened, SendResult):
                    return opened
                conn = opened
            relay: RelayState = conn.relay
            if relay.limiter is not None:  # this relay's rate: a slot of its schedule first
                relay.limiter.wait()
                if relay.limiter.cancelled:
                    return ABANDONED
            try:
                result = conn.send(env, self._then(conn, upcoming))
            except ConnectionLost as lost:
                self._drop(conn, lost=True)  # an ahead message on it goes fresh (send_then)
                if lost.retry_safe and reused and not retried:
                    retried = True  # not delivered: once more, at once, on a new connection
                    continue
                failure = connection_result(lost.cause, "connection lost")
                if lost.retry_safe and not reused and self._broke_fresh(f, relay, failure):
                    continue
                return failure
            if not conn.usable:  # 421: the server is closing the channel
                self._drop(conn, lost=True)
            return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._all)
        for conn in conns:
            self._drop(conn, lost=False)


class AsyncSmtpSender(_Counters):
    """For `--mode async`: connection pumps (pump.py), one coroutine per connection, each taking
    messages from a source and pipelining them over its connection. `serve` runs them for an
    engine's queue; `asend` queues one message for pumps of the sender's own. At most
    `max_connections` are open, all relays together (None: one per concurrent send at most),
    and at most each relay's own `max_connections` to it."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None = None,
                 local_hostname: str | None = None, max_connections: int | None = None,
                 limiters: Mapping[str, Limiter] | None = None, pool: RelayPool | None = None) -> None:
        super().__init__(smtp, composer, password=password, local_hostname=local_hostname,
                         limiters=limiters, pool=pool, max_connections=max_connections)
        self.max_connections = max_connections
        self.max_per_connection = smtp.max_per_connection
        self._live: set[AsyncConnection] = set()
        self._wanted: deque[asyncio.Future[None]] = deque()  # waiting for a connection (at a cap)
        self._calls = Calls()
        self._batch = WriteBatch()  # every connection's writes of a loop round go out together
        self._pumps: list[asyncio.Task[None]] = []  # asend's

    # -- for the engine
    async def serve(self, source: Source, concurrency: int) -> None:
        """Pump `source`'s messages over up to `concurrency` connections (fewer with a cap)
        until cancelled."""
        n = min(concurrency, self.max_connections or concurrency)
        caps = [r.relay.max_connections for r in self.pool.relays]
        if None not in caps:  # no more pumps than connections the relays allow together
            n = min(n, sum(c for c in caps if c is not None))
        await asyncio.gather(*(Pump(self, source).run() for _ in range(n)))

    # -- one message at a time
    async def asend(self, message: Message) -> SendResult:
        return await self._queue(message)

    async def asend_envelope(self, env: Envelope) -> SendResult:
        return await self._queue(env)

    async def _queue(self, message: Message | Envelope) -> SendResult:
        fut: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._calls.queue.append(Call(message, fut))
        if not self._calls.wake() and (self.max_connections is None
                                       or len(self._pumps) < self.max_connections):
            self._pumps.append(asyncio.get_running_loop().create_task(
                Pump(self, self._calls).run()))
        return await fut

    # -- for the pumps (pump.Opener)
    def envelope_of(self, message: Message | Envelope) -> Envelope | SendResult:
        return message if isinstance(message, Envelope) else self._envelope(message)

    async def connect(self, f: Failover, *, still_wanted: Callable[[], bool] | None = None,
                      at_cap: Callable[[], None] | None = None,
                      ) -> AsyncConnection | SendResult | None:
        """A new connection, on the relay the pool chooses, failing over; at a cap (`at_cap`
        called before waiting), once one closes, or None once `still_wanted` says the
        connection is no longer needed."""
        while True:
            a = self.pool.pick(f)
            if a is None and at_cap is not None:
                at_cap()
            if a is None and still_wanted is not None and not still_wanted():
                return None
            if a is None:  # at a cap: wait for a connection to close
                fut = asyncio.get_running_loop().create_future()
                self._wanted.append(fut)
                try:  # bounded: a relay out of rotation comes due for its probe with time alone
                    await asyncio.wait([fut], timeout=0.25)
                finally:
                    if not fut.done():  # no longer a waiter
                        fut.cancel()
                        self._wanted.remove(fut)
                continue
            if isinstance(a, SendResult):
                return a
            r = a.relay
            try:
                conn = await AsyncConnection.open(r.smtp, ehlo=self._ehlo, context=r.context,
                                                  password=r.password, batch=self._batch)
            except CONNECT_ERRORS as exc:
                f.last = self.pool.failed(a, exc)
                f.tried.append(r)
                self._wake()
                continue
            except BaseException:
                self.pool.released(r)
                self._wake()
                raise
            self.pool.connected(a)
            self.opened()
            conn.relay = r
            self._live.add(conn)
            return conn

    def end(self, conn: AsyncConnection, *, lost: bool) -> None:
        if conn.ended:
            return
        conn.ended = True
        self._live.discard(conn)
        self.pool.released(conn.relay)
        if lost:
            self.reconnected()
            conn.abort()
        self._wake()

    def broke_fresh(self, f: Failover, relay: RelayState, failure: SendResult) -> bool:
        return self._broke_fresh(f, relay, failure)

    def _wake(self) -> None:
        wake_one(self._wanted)

    async def quit(self, conns: list[AsyncConnection]) -> None:
        await quit_all(conns, min(self.smtp.timeout, 2.0))

    async def aclose(self) -> None:
        """Stop asend's pumps; QUIT every connection still open (the engine cancels its own
        pumps first)."""
        pumps, self._pumps = self._pumps, []
        for t in pumps:
            t.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        while self._calls.queue:  # queued, never taken: not sent
            self._calls.done(self._calls.queue.popleft(), ABANDONED, 0.0, 0.0)
        live = list(self._live)
        for conn in live:
            conn.ended = True
            self.pool.released(conn.relay)
        self._live.clear()
        await self.quit(live)

    def close(self) -> None:
        """Drop every connection at once (`aclose`, on the loop, says QUIT first)."""
        live, self._live = list(self._live), set()
        for conn in live:
            try:
                conn.abort()
            except RuntimeError:  # its event loop is closed already
                pass


def make_smtp_sender(config: SendConfig, *, campaign: str,
                     limiters: Mapping[str, Limiter] | None = None) -> SmtpSender | AsyncSmtpSender:
    """Called inside each sender actor: reads the templates and the passwords there. `limiters`:
    the actor's client of each rated relay's schedule, by relay name."""
    smtp = config.smtp
    composer = Composer(config.message, campaign=campaign)
    if config.mode == "async":
        return AsyncSmtpSender(smtp, composer, max_connections=smtp.max_connections,
                               limiters=limiters)
    return SmtpSender(smtp, composer, limiters=limiters)
