"""`FakeSender`: a real implementation of the seam, not a mock.

It waits `latency` seconds, fails a seeded, reproducible share of attempts, and can log every
delivery for tests that count sends independently of the ledger.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from ..messages import Message
from .base import DELIVERED, SendResult

_MASK = (1 << 64) - 1


def _unit(seed: int, key: int, salt: int) -> float:
    """A uniform float in [0, 1) from (seed, key, salt): splitmix64, stable across processes,
    so the same recipient fails the same way in every run and every test can predict it."""
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def fake_outcome(seed: int, recipient_id: int, attempt: int, *, fail_rate: float,
                 permanent_fail_rate: float) -> SendResult:
    """The fake sender's verdict for one attempt (attempt numbers start at 1).

    `permanent_fail_rate` of recipients are refused for good (a 550). `fail_rate` of recipients
    are "flaky": their first 1, 2 or 3 attempts (chosen per recipient) get a transient 421 and
    later ones succeed, so `--max-attempts 4` or more delivers every flaky recipient and
    `--max-attempts 1` fails exactly `fail_rate` of them. Reproducible from the seed alone.
    """
    if permanent_fail_rate and _unit(seed, recipient_id, 0) < permanent_fail_rate:
        return SendResult("permanent", "550 5.1.1 mailbox unavailable (injected)")
    if fail_rate and _unit(seed, recipient_id, 1) < fail_rate:
        streak = 1 + int(_unit(seed, recipient_id, 2) * 3)
        if attempt <= streak:
            return SendResult("transient", f"421 4.7.0 try again later (injected, attempt {attempt})")
    return DELIVERED


class FakeSender:
    """Sleeps `latency` seconds per email; thread-safe and usable from asyncio."""

    def __init__(self, *, latency: float, fail_rate: float = 0.0, permanent_fail_rate: float = 0.0,
                 seed: int = 0, send_log: str | None = None) -> None:
        self.latency = latency
        self.fail_rate = fail_rate
        self.permanent_fail_rate = permanent_fail_rate
        self.seed = seed
        self._attempts: dict[int, int] = {}
        self._lock = threading.Lock()
        # O_APPEND: each line is one write(2), so lines from many processes never interleave.
        self._log_fd = (os.open(send_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        if send_log else None)
        # Fault injection for tests: sending to one of these ids kills the process, as a
        # segfaulting library or an OOM kill would.
        crash = os.environ.get("BULKMAIL_FAKE_CRASH_IDS", "")
        self._crash_ids = {int(x) for x in crash.split(",") if x.strip()}

    def _verdict(self, message: Message) -> SendResult:
        if message.id in self._crash_ids:
            os._exit(86)
        if not (self.fail_rate or self.permanent_fail_rate):
            return DELIVERED
        with self._lock:
            attempt = self._attempts.get(message.id, 0) + 1
            self._attempts[message.id] = attempt
        result = fake_outcome(self.seed, message.id, attempt, fail_rate=self.fail_rate,
                              permanent_fail_rate=self.permanent_fail_rate)
        if result.ok:
            with self._lock:
                self._attempts.pop(message.id, None)
        return result

    def _delivered(self, message: Message) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, b"%d\n" % message.id)

    def send(self, message: Message) -> SendResult:
        if self.latency:
            time.sleep(self.latency)
        result = self._verdict(message)
        if result.ok:
            self._delivered(message)
        return result

    async def asend(self, message: Message) -> SendResult:
        await asyncio.sleep(self.latency)
        result = self._verdict(message)
        if result.ok:
            self._delivered(message)
        return result

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    async def aclose(self) -> None:
        self.close()
