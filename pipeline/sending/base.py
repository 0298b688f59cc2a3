"""The narrow I/O seam: `Sender.send(message) -> SendResult` (and `asend` for the async engine).

This module imports no implementation: the fake (`fake.py`) and SMTP (`smtp.py`) senders live
beside it, and `pipeline.sending.make_sender` chooses one, as httpx chooses its transports
outside its base module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ..messages import Message

Outcome = Literal["sent", "transient", "permanent"]


@dataclass(frozen=True, slots=True)
class SendResult:
    status: Outcome
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "sent"


DELIVERED = SendResult("sent")  # the one result every successful send returns
# Not sent because the run is stopping (a sender waiting for a relay's rate slot was cancelled):
# the engines abandon the message (a resume sends it) instead of recording an attempt.
ABANDONED = SendResult("transient", "not sent: the run is stopping")


@runtime_checkable
class Sender(Protocol):
    def send(self, message: Message) -> SendResult: ...
    def close(self) -> None: ...
    # Optional: `cancel()` (called by `Engine.stop`) makes sends waiting inside the sender (for
    # a relay's rate slot) return ABANDONED at once.


@runtime_checkable
class ChainingSender(Protocol):
    """A blocking sender that may start the next message while this one's data goes out (SMTP
    with PIPELINING: its commands in the same write). `upcoming()` gives that next message, or
    None; a message it took must be the one `send_then` is called with next, whatever happens
    (its transaction is under way on this thread's connection)."""

    def send_then(self, message: Message, upcoming: Callable[[], Message | None]) -> SendResult: ...


@runtime_checkable
class WarmingSender(Protocol):
    """A blocking sender that can open the calling thread's connection before its first message
    (SmtpSender): a pool of threads then connects while the actor waits for its first batch,
    not all at once in the run's first round."""

    def warm(self) -> None: ...


@runtime_checkable
class AsyncSender(Protocol):
    async def asend(self, message: Message) -> SendResult: ...
    async def aclose(self) -> None: ...


@runtime_checkable
class ServingSender(Protocol):
    """An async sender that takes its messages itself (SMTP's connection pumps, pump.py): the
    engine hands it its queue (a pump.Source) instead of calling `asend` per message."""

    async def serve(self, source: Any, concurrency: int) -> None: ...
