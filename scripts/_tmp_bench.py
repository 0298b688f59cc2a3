"""One async sender actor's work without Ray: what a message costs the send loop.

    python scripts/bench_send_loop.py [--messages 100000] [--concurrency 2000]

The same pieces a `--mode async --sender smtp` actor runs (messages.from_batch, the Composer,
AsyncSmtpSender over up to 100 connections, AsyncEngine, LedgerWriter), fed batches of 1,000
rows from 6 threads as Ray Data's calls feed them, into one `smtp-sink`. Prints messages/s and
the CPU per message of this process and of the sink, then each of its own stages alone (rows
into Messages, composing, the ledger) over the same rows; with no Ray in the way, a change to the
composer or the client shows here first (README, "SMTP throughput").
"""

from __future__ import annotations

import argparse
import gc, os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_smtp import BODY, FROM, SUBJECT, cpu_seconds  # noqa: E402
from bench_smtp_clients import SmtpSink  # noqa: E402

from pipeline import generate, ledger, messages  # noqa: E402
from pipeline.compose import Composer  # noqa: E402
from pipeline.config import MessageConfig, RetryPolicy, SendConfig, SmtpConfig  # noqa: E402
from pipeline.sending import make_sender  # noqa: E402
from pipeline.sending.aio import AsyncEngine  # noqa: E402


def stages(batches: list[pa.Table], fields: tuple[str, ...], composer: Composer,
           work: Path) -> tuple[float, float, float]:
    """The CPU per message of the loop's own-code stages, each run alone over the same rows:
    turning a batch into Messages, composing each, recording each in a ledger and flushing."""
    msgs: list[messages.Message] = []
    cpu0 = time.process_time()
    for b in batches:
        msgs += messages.from_batch(b, campaign="loop", domain="bulkmail.example", fields=fields)
    cpu1 = time.process_time()
    for m in msgs:
        composer.envelope(m)
    cpu2 = time.process_time()
    writer = ledger.LedgerWriter(str(work / "stages"), writer="w", node="n", run="r", epoch=1)
    now = time.time()
    for i in range(0, len(msgs), 1000):
        for m in msgs[i:i + 1000]:
            writer.record(m.id, m.to, "sent", 1, None, now, now, 0.001, m.message_id)
        writer.flush()
    cpu3 = time.process_time()
    n = len(msgs) / 1e6
    return (cpu1 - cpu0) / n, (cpu2 - cpu1) / n, (cpu3 - cpu2) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=2000)
    a = ap.parse_args(argv)
    gc.set_threshold(50_000, 20, 100)  # as the sender actor sets it (actors.py)
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    (work / "body.txt").write_text(BODY)
    sink = SmtpSink(None)
    try:
        cfg = SendConfig(actors=1, mode="async", concurrency_per_actor=a.concurrency,
                         sender="smtp", metrics=False,
                         retry=RetryPolicy(max_attempts=3, backoff_base=0.1),
                         smtp=SmtpConfig(host="127.0.0.1", port=sink.port,
                                         max_per_connection=100_000),
                         message=MessageConfig(from_addr=FROM, subject=SUBJECT,
                                               template=str(work / "body.txt")))
        sender = make_sender(cfg, campaign="loop")
        writer = ledger.LedgerWriter(str(work / "run"), writer="w", node="n", run="r", epoch=1)
        engine = AsyncEngine(sender, concurrency=a.concurrency, retry=cfg.retry, ledger=writer)
        table = generate.generate(a.messages, seed=1).to_arrow()
        fields = tuple(c for c in table.column_names if c not in ("id", "email"))
        batches = [table.slice(i, 1000) for i in range(0, a.messages, 1000)]

        def one(batch: pa.Table) -> int:
            msgs = messages.from_batch(batch, campaign="loop", domain="bulkmail.example",
                                       fields=fields)
            writer.assign([m.id for m in msgs], [0] * len(msgs))
            sent = engine.run(msgs).sent
            writer.flush()
            return sent

        cpu0, sink0, t0 = time.process_time(), cpu_seconds(sink.pid), time.perf_counter(); T0 = os.times()
        with ThreadPoolExecutor(6) as pool:
            sent = sum(pool.map(one, batches))
        wall = time.perf_counter() - t0; T1 = os.times(); print("user", (T1.user-T0.user)/sent*1e6, "sys", (T1.system-T0.system)/sent*1e6)
        total = (time.process_time() - cpu0) / sent * 1e6
        print(f"{sent:,} messages: {sent / wall:,.0f}/s; CPU per message: this process "
              f"{total:.0f} µs, the sink {(cpu_seconds(sink.pid) - sink0) / sent * 1e6:.0f} µs")
        engine.close()
        rows, compose, record = stages(batches, fields, Composer(cfg.message, campaign="loop"),
                                       work)
        print(f"stages alone, CPU µs per message: rows {rows:.1f}, compose {compose:.1f}, "
              f"ledger {record:.1f}; the rest (client, engine, event loop, threads) "
              f"{total - rows - compose - record:.0f}")
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
