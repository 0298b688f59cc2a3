"""What a person sees: a real CLI run in a 100-column pseudo-terminal, and the dashboard reached
with exactly what the run prints."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.console import fit, progress_fields
from pipeline.hooks import Progress

from .conftest import cli_env, write_recipients

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = ("WARNING", "INFO", "Deprecat", "core_worker", "raylet")


def run_in_pty(args: list[str], cwd: Path, columns: int = 100, timeout: float = 240,
               own_ray: bool = True,
               on_output: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run the CLI with its stdout and stderr on a pseudo-terminal `columns` wide; by default
    with a Ray of its own (its start, its logs, its dashboard line on this console).
    `on_output` sees the text so far after each read, while the run goes on."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = cli_env({"COLUMNS": str(columns)}, own_ray=own_ray)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if on_output is not None:
                on_output(b"".join(chunks).decode("utf-8", "replace"))
        elif proc.poll() is not None:
            break
    os.close(master)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode("utf-8", "replace")


def screen_lines(text: str) -> list[str]:
    """What the terminal shows line by line: every carriage return starts the line over."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        for piece in line.split("\r"):
            out.append(ANSI.sub("", piece))
    return out


def test_progress_line_fits_any_width() -> None:
    p = Progress(total=1_000_000, sent=123_456, failed=7, abandoned=0, retries=3, elapsed=5,
                 rate=1599.5)
    for width in (20, 40, 80, 100, 200):
        assert len(fit(progress_fields(p), width)) < width
    assert fit(progress_fields(p), 80).startswith("123,463/1,000,000 (12.3%)")


def check_dashboard(url: str, command: str, pool: str) -> None:
    """The dashboard's HTTP API, reached with exactly what the run printed: refused without
    the token, and listing the run's sender actors with it."""
    token = subprocess.run(command.split(), capture_output=True, text=True,
                           timeout=60).stdout.strip()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/version", timeout=10)
    assert refused.value.code == 401  # token authentication is on
    req = urllib.request.Request(f"{url}/api/v0/actors?limit=100",
                                 headers={"Authorization": f"Bearer {token}"})
    body = ""
    for _ in range(60):  # the pool's actors start a few seconds after the dashboard
        body = urllib.request.urlopen(req, timeout=30).read().decode()
        if pool in body:
            break
        time.sleep(0.5)
    assert pool in body, body[:500]


class DashboardCheck:
    """Runs `check_dashboard` on a thread once the run has printed the dashboard's address and
    the command that prints its token, while the run is still sending: the console test's Ray
    of its own serves this check too (a start costs 10-20 s of a 2-core machine)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.done = False

    def __call__(self, text: str) -> None:
        if self.thread is not None:
            return
        screen = "\n".join(screen_lines(text))
        url = re.search(r"Ray dashboard: (http://\S+)", screen)
        command = re.search(r"token `([^`]+)` prints", screen)
        if url and command:
            self.thread = threading.Thread(target=self._run, args=(url.group(1), command.group(1)),
                                           daemon=True)
            self.thread.start()

    def _run(self, url: str, command: str) -> None:
        try:
            check_dashboard(url, command, self.pool)
            self.done = True
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.error = exc

    def result(self) -> None:
        assert self.thread is not None, "no dashboard access printed"
        self.thread.join(120)
        if self.error is not None:
            raise self.error
        assert self.done


@pytest.mark.slow
def test_console_in_a_100_column_terminal_is_quiet_and_fits_and_its_dashboard_answers(
        tmp_path: Path) -> None:
    write_recipients(tmp_path / "in.parquet", 3000)
    # 0.05 s a send: 2 x 10 threads take 7.5 s, so the dashboard is asked while the run sends.
    common = ["--input", "in.parquet", "--actors", "2", "--threads-per-actor", "10", "--no-charts"]
    args = [*common, "--campaign", "pty", "--latency", "0.05"]
    dashboard = DashboardCheck("SendBatches[pty]")
    code, text = run_in_pty(args, tmp_path, on_output=dashboard)
    assert code == 0, text
    dashboard.result()
    lines = screen_lines(text)
    assert all(len(ln) <= 100 for ln in lines), max(lines, key=len)
    for word in NOISE:
        assert not [ln for ln in lines if word in ln], (word, text)
    assert any(ln.startswith("Ray dashboard: http://") for ln in lines), text
    assert any("ray get-auth-token" in ln for ln in lines), text
    assert any(re.match(r"\s+sent\s+3,000$", ln) for ln in lines), text
    (log_line,) = [ln for ln in lines if "Ray's log:" in ln]
    log = tmp_path / log_line.split("Ray's log:")[1].strip()
    assert log.is_file() and "core_worker" in log.read_text()  # Ray's lines went there

    # Joining the session's Ray (10 s less than starting one): the driver's own INFO lines
    # (Ray Data's) and the workers' output are shown all the same.
    code, text = run_in_pty([*common, "--campaign", "pty-verbose", "--verbose", "--latency",
                             "0.02"], tmp_path, own_ray=False)
    assert code == 0, text
    assert any(word in text for word in ("INFO", "core_worker", "WARNING")), text
