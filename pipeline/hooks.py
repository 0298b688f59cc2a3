"""How the library talks to whoever runs it, without printing: progress, info lines, a stop
request, and the wall time of each stage. The CLI renders these; tests read them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Progress:
    total: int
    sent: int
    failed: int
    abandoned: int
    retries: int
    elapsed: float
    rate: float  # emails/s over the last RATE_WINDOW seconds (start-up does not drag the ETA)
    stopping: bool = False

    @property
    def done(self) -> int:
        """Recipients with a final outcome (abandoned ones are not: a resume sends them)."""
        return self.sent + self.failed

    @property
    def eta(self) -> float | None:
        return (self.total - self.done - self.abandoned) / self.rate if self.rate > 0 else None


@dataclass
class Hooks:
    on_progress: Callable[[Progress], None] | None = None
    on_info: Callable[[str], None] | None = None
    # Called with a log file's path just before Ray starts: the CLI sends the process's own
    # stdout and stderr (Ray's console output, C++ lines included) there.
    before_ray: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def info(self, text: str) -> None:
        if self.on_info:
            self.on_info(text)


class Stages:
    """Wall time per stage, each measured where its work finishes (Ray Data is lazy)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
