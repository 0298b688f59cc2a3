"""What a person sees: the terminal streams, the live progress line, and where Ray's own console
output goes instead (a log file the run names).

Ray writes to the process's file descriptors 1 and 2 from places no Python setting reaches (the
core worker's C++ `E ... core_worker.cc` lines, the token-authentication warning, Ray Data's
INFO lines). So the console keeps its own copies of the terminal's descriptors, taken at start,
and before Ray starts points 1 and 2 at the log file (`redirect`): everything Ray prints lands
there, and only bulkmail's own lines reach the terminal.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import IO, Any

from .hooks import Progress


class Console:
    """bulkmail's own output streams, independent of file descriptors 1 and 2."""

    def __init__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Duplicates are not inherited by child processes (PEP 446): Ray's never write here.
        self.out: IO[str] = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.err: IO[str] = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        self.log_file: str | None = None

    def redirect(self, path: str) -> None:
        """Send fds 1 and 2 (Ray's console output, warnings, stray prints) to `path`."""
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log_file = path

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_fields(p: Progress) -> list[str]:
    """The progress line's parts, most important first (a narrow terminal drops the tail)."""
    pct = 100.0 * p.done / p.total if p.total else 100.0
    parts = [f"{p.done:,}/{p.total:,} ({pct:.1f}%)", f"{p.rate:,.0f}/s", f"ETA {_fmt_eta(p.eta)}",
             f"sent {p.sent:,}", f"failed {p.failed:,}", f"retries {p.retries:,}"]
    if p.stopping:
        parts.insert(0, "stopping")
        if p.abandoned:
            parts.insert(2, f"{p.abandoned:,} left for the resume")
    return parts


def log_line(p: Progress) -> str:
    """The full progress line, for logs (no width to fit)."""
    eta = "–" if p.eta is None else f"{p.eta:,.0f}s"
    pct = 100.0 * p.done / p.total if p.total else 100.0
    line = (f"sent {p.sent:,}  failed {p.failed:,}  retries {p.retries:,}  "
            f"{p.done:,}/{p.total:,} ({pct:.1f}%)  {p.rate:,.0f} emails/s  ETA {eta}")
    if p.stopping:
        line += f"  (stopping: {p.abandoned:,} left for the resume)"
    return line


def fit(parts: list[str], width: int, sep: str = "  ") -> str:
    """As many parts as fit in `width - 1` columns (the last column would wrap on some
    terminals); the first part is cut if even it alone does not fit."""
    out = ""
    for part in parts:
        candidate = part if not out else out + sep + part
        if len(candidate) > width - 1:
            break
        out = candidate
    return out or parts[0][: max(1, width - 1)]


class ProgressPrinter:
    """A live line on a terminal, as wide as the terminal allows; a timestamped log line every
    `every` seconds otherwise."""

    def __init__(self, every: float, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0
        self._live = False

    def __call__(self, p: Progress) -> None:
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r\033[K" + fit(progress_fields(p), width))
            self.stream.flush()
            self._live = True
            return
        now = time.monotonic()
        if now - self._last >= self.every or p.done + p.abandoned >= p.total:
            self._last = now
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {log_line(p)}\n")
            self.stream.flush()

    def end(self) -> None:
        """Close the live line so that what follows starts on a line of its own."""
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False
