"""What both SMTP senders (smtp.py) share: their settings, the relay pool they open connections
through, the EHLO name, the connection counters, composing, and going on to another relay when a
fresh connection broke."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from ..compose import ComposeError, Composer, Envelope
from ..config import Relay, SmtpConfig
from ..messages import Message
from .base import SendResult
from .relays import Failover, Limiter, RelayPool, RelayState, env_password


class _Counters:
    """What both SMTP senders share: their settings, relays, EHLO name and counters."""

    def __init__(self, smtp: SmtpConfig, composer: Composer, *, password: str | None,
                 local_hostname: str | None, limiters: Mapping[str, Limiter] | None,
                 pool: RelayPool | None, max_connections: int | None) -> None:
        self._lock = threading.Lock()
        self.connections_opened = 0
        self.reconnects = 0
        self.smtp = smtp
        self.composer = composer

        def given(_: Relay) -> str | None:
            return password
        self.pool = pool or RelayPool(smtp, password=env_password if password is None else given,
                                      limiters=limiters, max_connections=max_connections)
        # EHLO name: the From domain, not socket.getfqdn() (a DNS lookup per connection).
        self._ehlo = local_hostname or composer.envelope_from.rpartition("@")[2] or "localhost"

    def opened(self) -> None:
        with self._lock:
            self.connections_opened += 1

    def reconnected(self) -> None:
        with self._lock:
            self.reconnects += 1

    def cancel(self) -> None:
        """The run is stopping (Engine.stop): sends waiting for a relay's slot answer ABANDONED."""
        self.pool.cancel()

    def _envelope(self, message: Message) -> Envelope | SendResult:
        try:
            return self.composer.envelope(message)
        except ComposeError as exc:
            return SendResult("permanent", f"message not built: {exc}")

    def _broke_fresh(self, f: Failover, relay: RelayState, failure: SendResult) -> bool:
        """A fresh connection to `relay` broke before the data: with other relays, the send goes
        on to them (True); with one, `failure` is its result (False)."""
        if not self.pool.rotation:
            return False
        self.pool.lost(relay, failure)
        f.tried.append(relay)
        f.last = failure
        return True
