"""Real mail at the speed of the fake? bulkmail against Postfix's smtp-sink, beside a hand-written
client and the machine's limit, in one run against one sink.

    python scripts/bench_smtp.py                      # 100,000 personalised messages per client
    python scripts/bench_smtp.py --card               # also: 8 × 100 threads vs a 1 s-per-DATA sink
    python scripts/bench_smtp.py --card-only [--card-server exact|aiosmtpd]   # only that, against
                                        # a sink asked to wait 1 s (its own process)

Rows, all into the same `smtp-sink` (a C server that accepts and discards, offers PIPELINING):
  baseline  the client people write by hand: a ThreadPoolExecutor of 100 threads, one reused
            smtplib connection each, every message personalised with the `email` package
            (EmailMessage) and Jinja2, one `send_message` per recipient;
  raw       a raw pipelined asyncio + uvloop client over pre-rendered bytes (one round trip per
            message): the machine's limit for the protocol alone;
  threads   bulkmail --sender smtp, --mode threads (2 actors × 100 threads);
  async     bulkmail --sender smtp, --mode async (2 actors × 2,000, 100 connections each).
bulkmail's rate is its send window (first start to last end, from its own ledger), the same
measure the report prints; its whole-command rate (Ray start included) is shown beside it, and
the whole machine's CPU in the send window per message (every process: the sink, Ray, the
driver; /proc/stat), the number the README's sizing uses.
`--card` adds the card's configuration (8 actors × 100 threads) over 16,000 messages against a
sink that waits 1 s per DATA: the ideal is 800 messages/s. Under 800 connections smtp-sink's
wait is not one second (scripts/sink_wait_probe.py); `--card-server exact` uses
scripts/exact_wait_sink.py instead, which waits 1 s exactly, and `--card-server aiosmtpd`
bulkmail's aiosmtpd sink (`scripts/smtp_sink.py --delay 1`), each in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import smtplib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_smtp_clients import SmtpSink, Source, messages, raw_run, timed  # noqa: E402
from exact_wait_sink import ExactWaitSink  # noqa: E402
from jinja2 import Template  # noqa: E402
from smtp_sink import SinkProcess  # noqa: E402

from pipeline import generate  # noqa: E402
from pipeline.campaign import run_campaign  # noqa: E402
from pipeline.config import (  # noqa: E402
    CampaignConfig,
    MessageConfig,
    RetryPolicy,
    SendConfig,
    SmtpConfig,
)

FROM = "News <news@bulkmail.example>"
SUBJECT = "Hello {{ name }}, news for {{ city }}"
BODY = "Dear {{ name }},\n\nthis is the {{ plan }} plan newsletter for {{ city }}.\n\n-- bulkmail\n"


def baseline(port: int, people: list[dict[str, Any]], threads: int = 100) -> int:
    """The hand-written client: personalise with Jinja2 and EmailMessage, smtplib per thread."""
    import threading
    local = threading.local()
    subject, body = Template(SUBJECT), Template(BODY)
    clients: list[smtplib.SMTP] = []

    def one(p: dict[str, Any]) -> int:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example")
            clients.append(c)
        m = EmailMessage()
        m["From"], m["To"] = FROM, f"{p['name']} <{p['email']}>"
        m["Subject"] = subject.render(p)
        m["Message-ID"] = f"<baseline.{p['id']}@bulkmail.example>"
        m.set_content(body.render(p))
        c.send_message(m)
        return 1

    with ThreadPoolExecutor(threads) as pool:
        sent = sum(pool.map(one, people))
    for c in clients:
        c.quit()
    return sent


def bulkmail(port: int, path: Path, work: Path, *, mode: str, actors: int, per_actor: int,
             campaign: str) -> tuple[float, float, int]:
    """(send-window msg/s, whole-command msg/s, sent) for one bulkmail run into the sink."""
    body = work / "body.txt"
    body.write_text(BODY)
    send = SendConfig(actors=actors, mode=mode, threads_per_actor=per_actor,
                      concurrency_per_actor=per_actor, sender="smtp", cpus_per_actor=0.25,
                      retry=RetryPolicy(max_attempts=3, backoff_base=0.1), metrics=False,
                      smtp=SmtpConfig(host="127.0.0.1", port=port, max_per_connection=100_000),
                      message=MessageConfig(from_addr=FROM, subject=SUBJECT, template=str(body)))
    t0 = time.perf_counter()
    rep: Any = run_campaign(CampaignConfig(input=str(path), campaign=campaign, dashboard=False,
                                           runs_dir=str(work / "runs"), charts=False,
                                           restart=True, send=send))
    wall = time.perf_counter() - t0
    return rep.send.emails_per_s, rep.counts.sent / wall, rep.counts.sent


class MachineCpu:
    """The whole machine's busy CPU time (every process, kernel included; /proc/stat),
    sampled every 50 ms in a thread, so that a span found afterwards (a send window, from the
    ledger) can be charged what the machine spent in it."""

    def __init__(self) -> None:
        import threading
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def busy() -> float:
        user, nice, system, _idle, _iowait, irq, softirq = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.busy()))
            self._stop.wait(0.05)

    def __enter__(self) -> MachineCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds the machine spent from t0 to t1 (the samples nearest inside)."""
        inside = [b for t, b in self.samples if t0 <= t <= t1]
        return inside[-1] - inside[0] if len(inside) > 1 else 0.0


def window_of(run_dir: Path) -> tuple[float, float]:
    """The send window of a run (first attempt's start, last attempt's end), epoch seconds."""
    from pipeline import ledger
    frame = ledger.read_ledger(str(run_dir))
    return (frame["started_at"].min().timestamp(),  # type: ignore[union-attr]
            frame["finished_at"].max().timestamp())  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def card_shape(run_dir: Path, trim: float = 3.0) -> dict[str, float] | None:
    """From the card's ledger: `steady`, the rate (messages/s) once every actor sends, without
    the send window's first and last `trim` seconds; `spread`, how far apart the actors' first
    emails went out (s); `fewest` and `most`, messages per actor. None for a run too short to
    say. Against a sink that answers in bursts, the steady span runs from one burst's first
    reply to another's (a burst: replies less than 0.3 s apart), so it holds whole bursts."""
    import polars as pl

    from pipeline import ledger
    sent = ledger.read_ledger(str(run_dir)).filter(pl.col("status") == "sent")
    if sent.height == 0:
        return None
    done = sent["finished_at"].sort()
    lo = sent["started_at"].min() + timedelta(seconds=trim)
    hi = done[-1] - timedelta(seconds=trim)
    if hi - lo < timedelta(seconds=trim):
        return None
    gap = done.diff().dt.total_microseconds().fill_null(10**9) > 300_000
    bursts = done.filter(gap & (done >= lo) & (done <= hi))
    a, b = (bursts[0], bursts[-1]) if bursts.len() >= 2 else (lo, hi)
    inside = done.filter((done >= a) & (done < b)).len()
    per_actor = sent.group_by("actor").agg(pl.len().alias("n"), pl.col("started_at").min())
    first = per_actor["started_at"]
    return {"steady": inside / (b - a).total_seconds(),
            "spread": (first.max() - first.min()).total_seconds(),
            "fewest": float(per_actor["n"].min()), "most": float(per_actor["n"].max())}


def card_server(kind: str) -> tuple[Any, Any]:
    """The card's server, waiting 1 s per DATA in a process of its own, and how to stop it."""
    if kind == "exact":
        exact = ExactWaitSink(1.0)
        return exact, exact.stop
    if kind == "aiosmtpd":
        server = SinkProcess("--delay", "1")
        return server, server.stop
    sink = SmtpSink(1)
    return sink, sink.stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000,
                    help="per client (a run needs tens of thousands to get past its start-up)")
    ap.add_argument("--baseline-messages", type=int, default=5_000,
                    help="for the hand-written baseline, which manages a few hundred a second")
    ap.add_argument("--card", action="store_true", help="also the card's 8 × 100 against -w 1")
    ap.add_argument("--card-only", action="store_true", help="only the card's run")
    ap.add_argument("--card-server", choices=("smtp-sink", "exact", "aiosmtpd"),
                    default="smtp-sink", help="the card's server: smtp-sink -w 1, or one that "
                    "is asked to wait 1 s (exact_wait_sink.py, or aiosmtpd)")
    a = ap.parse_args(argv)
    import ray
    # One local Ray for every bulkmail row (as a long-lived cluster would be).
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    import ray.data  # configures its own logging when first imported: quieted after that
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    if not a.card_only:
        people = generate.generate(a.messages, seed=1)
        path = work / "in.parquet"
        people.write_parquet(path)
        rows: list[tuple[str, float, str]] = []
        sink = SmtpSink(None)
        try:
            t0 = time.perf_counter()
            n = baseline(sink.port, people.head(a.baseline_messages).to_dicts())
            rows.append(("baseline: ThreadPoolExecutor × 100, smtplib, EmailMessage",
                         n / (time.perf_counter() - t0), ""))
            raw = timed("raw", "", lambda: raw_run(sink.port, Source(messages(a.messages), 60), 100))
            rows.append(("raw pipelined asyncio + uvloop, 100 connections", raw.rate, ""))
            for mode, per_actor in (("threads", 100), ("async", 2000)):
                with MachineCpu() as machine:
                    window, whole, sent = bulkmail(sink.port, path, work, mode=mode, actors=2,
                                                   per_actor=per_actor, campaign=f"bench-{mode}")
                assert sent == a.messages, (mode, sent)
                used = machine.between(*window_of(work / "runs" / f"bench-{mode}"))
                rows.append((f"bulkmail --mode {mode}, 2 actors × {per_actor}", window,
                             f"whole command {whole:,.0f}/s; in the send window the machine "
                             f"(sink, Ray, driver) {used / sent * 1e6:.0f} µs a message"))
        finally:
            sink.stop()
        base, limit = rows[0][1], rows[1][1]
        print(f"{a.messages:,} personalised messages per client ({a.baseline_messages:,} for the "
              "baseline) into one smtp-sink, 2 cores\n")
        print("| client | messages/s | vs baseline | vs raw | note |")
        print("|---|---:|---:|---:|---|")
        for name, rate, note in rows:
            print(f"| {name} | {rate:,.0f} | {rate / base:.1f}× | {rate / limit:.2f} | {note} |")
    if a.card or a.card_only:
        card = generate.generate(16_000, seed=2)
        card_path = work / "card.parquet"
        card.write_parquet(card_path)
        server, stop = card_server(a.card_server)
        try:
            cpu0 = cpu_seconds(server.pid)
            window, _, sent = bulkmail(server.port, card_path, work, mode="threads", actors=8,
                                       per_actor=100, campaign="bench-card")
            server_cpu = cpu_seconds(server.pid) - cpu0
        finally:
            stop()
        run_dir = work / "runs" / "bench-card"
        latency = json.loads((run_dir / "report.json").read_text())["latency_s"]
        name = {"smtp-sink": "smtp-sink -w 1", "exact": "exact_wait_sink.py --wait 1",
                "aiosmtpd": "aiosmtpd, smtp_sink.py --delay 1"}[a.card_server]
        shape = card_shape(run_dir)
        print(f"\ncard (8 actors × 100 threads) vs {name}, {sent:,} messages: "
              f"{window:,.0f}/s in the send window, {window / 800:.2f} of the ideal 800/s "
              f"(latency p50 {latency['p50']:.3f} s, p99 {latency['p99']:.3f} s)")
        if shape is not None:
            print(f"  once every actor sends (the window less its first and last 3 s): "
                  f"{shape['steady'] / 800:.2f} of ideal; the actors' first emails "
                  f"{shape['spread']:.2f} s apart; {shape['fewest']:,.0f}-{shape['most']:,.0f} "
                  "messages per actor")
        if sent:
            print(f"  the server's CPU: {server_cpu / sent * 1e6:.0f} µs per message")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
