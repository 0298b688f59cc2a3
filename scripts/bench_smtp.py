"""Messages per second into a loopback SMTP sink: bulkmail against the loop people write by hand.

    python scripts/bench_smtp.py                         # sink delays 0 and 0.02 s per message
    python scripts/bench_smtp.py --delays 0 --rows 20000 --actors 2 --threads-per-actor 20

For each sink delay (the time a server takes to accept a message's DATA: 0 is a sink that
answers at once, tens of milliseconds is a real server scanning and queueing), the script runs
against the same sink:

- baseline: one smtplib connection, one `EmailMessage` per recipient (same subject and body
  templates rendered with Jinja2), `send_message` in a loop;
- bulkmail: `run_campaign` with `--sender smtp` through a local Ray started beforehand.

The sink runs in its own process, so it competes with neither client for a GIL. bulkmail's
rate is taken two ways: over its send window (first send started → last finished, from the
ledger) and over the whole send stage (with actor start-up). The baseline's is its loop's
wall time. The ratio uses the window rate.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import smtplib
import sys
import tempfile
import time
from email.message import EmailMessage
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import polars as pl
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline import generate
from pipeline.campaign import run_campaign
from pipeline.config import CampaignConfig, MessageConfig, RetryPolicy, SendConfig, SmtpConfig

SUBJECT = "Hello {{ name }}, news for {{ city }}"
BODY = ("Dear {{ name }},\n\nthis is the {{ plan }} plan newsletter for {{ city }}.\n"
        "Thank you for being with us since {{ signup_year }}.\n\n-- bulkmail\n")
FROM = "bulkmail bench <bench@bulkmail.example>"


def serve(port: int, delay: float, pipe: Connection) -> None:
    """The sink, in a child process: answers 'stats' and 'stop' on the pipe."""
    from pipeline.lab.sink import Sink
    sink = Sink("127.0.0.1", port, keep=False, delay=delay).start()
    pipe.send("ready")
    while True:
        cmd = pipe.recv()
        pipe.send((sink.stats.messages, sink.stats.connections))
        if cmd == "stop":
            sink.stop()
            return


class SinkProcess:
    def __init__(self, delay: float) -> None:
        from pipeline.lab.sink import free_port
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve, args=(self.port, delay, child), daemon=True)
        self._proc.start()
        assert self._pipe.recv() == "ready"

    def stats(self) -> tuple[int, int]:
        self._pipe.send("stats")
        out: tuple[int, int] = self._pipe.recv()
        return out

    def stop(self) -> tuple[int, int]:
        self._pipe.send("stop")
        out: tuple[int, int] = self._pipe.recv()
        self._proc.join(10)
        return out


def baseline(port: int, people: pl.DataFrame) -> float:
    """The hand-written loop: one connection, build and send each message in turn."""
    env = ImmutableSandboxedEnvironment()
    subject, body = env.from_string(SUBJECT), env.from_string(BODY)
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        for row in people.iter_rows(named=True):
            m = EmailMessage()
            m["From"] = FROM
            m["To"] = f"{row['name']} <{row['email']}>"
            m["Subject"] = subject.render(row)
            m.set_content(body.render(row))
            smtp.send_message(m)
    return people.height / (time.perf_counter() - t0)


def bulkmail(port: int, path: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    body = work / "body.txt"
    body.write_text(BODY)
    rep = run_campaign(CampaignConfig(
        input=str(path), campaign="bench", runs_dir=str(work / "runs"), dashboard=False,
        charts=False, restart=True,
        send=SendConfig(actors=a.actors, threads_per_actor=a.threads_per_actor, sender="smtp",
                        cpus_per_actor=0.25, retry=RetryPolicy(max_attempts=3, backoff_base=0.1),
                        smtp=SmtpConfig(host="127.0.0.1", port=port,
                                        max_per_connection=a.max_per_connection),
                        message=MessageConfig(from_addr=FROM, subject=SUBJECT,
                                              template=str(body)))))
    return rep.to_json()  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000, help="recipients for bulkmail")
    p.add_argument("--baseline-seconds", type=float, default=8.0,
                   help="about how long the baseline loop runs (its row count is chosen from a "
                   "short probe)")
    p.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.02],
                   help="sink delays per message, in seconds")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--threads-per-actor", type=int, default=50)
    p.add_argument("--max-per-connection", type=int, default=100)
    a = p.parse_args(argv)

    import logging

    import ray
    # A fresh local Ray, started before the clock runs ("local": never a cluster someone
    # left running with `ray start`); run_campaign uses it.
    ray.init(address="local", num_cpus=max(4, a.actors + 2), include_dashboard=False,
             logging_level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    try:
        path = work / "in.parquet"
        people = generate.generate(a.rows, seed=1)
        people.write_parquet(path)
        lines = []
        for delay in a.delays:
            sink = SinkProcess(delay)
            probe = baseline(sink.port, people.head(50))
            n = max(50, min(a.rows, int(probe * a.baseline_seconds)))
            base = baseline(sink.port, people.head(n))
            rep = bulkmail(sink.port, path, work, a)
            received, connections = sink.stop()
            expected = 50 + n + a.rows
            window = rep["send"]["emails_per_s"]
            stage = a.rows / rep["stages_s"]["send"]
            line = (f"sink delay {delay * 1000:.0f} ms: baseline {base:,.0f} msg/s ({n:,} messages, "
                    f"1 connection); bulkmail {window:,.0f} msg/s over the send window, "
                    f"{stage:,.0f} msg/s over the send stage incl. actor start "
                    f"({a.rows:,} messages, {a.actors} actors x {a.threads_per_actor} threads, "
                    f"{connections:,} connections); ratio {window / base:.1f}x")
            print(line, flush=True)
            lines.append(line)
            if received != expected or rep["counts"]["sent"] != a.rows:
                print(f"  WARNING: sink received {received:,}, expected {expected:,}; "
                      f"ledger sent {rep['counts']['sent']:,}", flush=True)
        if len(lines) > 1:
            print("\n" + "\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
